package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// placedOwners registers n apps and asks asked for each, as workers that
// all list the same server first do; it returns each app's owner id,
// waiting until that owner acts.
func placedOwners(t *testing.T, asked *server.Node, nodes []*server.Node, n int) map[int64]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w := newWorker(t)
	byAddr := map[string]string{}
	for _, node := range nodes {
		byAddr[node.Addr()] = node.ID()
	}
	owners := map[int64]string{}
	for i := range n {
		app, err := asked.Registry().Register(ctx, fmt.Sprintf("app-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		r := w.get(asked.Addr(), "/server/acquire", url.Values{"appId": {strconv.FormatInt(app.ID, 10)}, "protocol": {"HTTP"}})
		var addr string
		if err := json.Unmarshal(r.data, &addr); err != nil || !r.success {
			t.Fatalf("acquire app %d: %d %v %q", app.ID, r.status, r.success, r.message)
		}
		owners[app.ID] = byAddr[addr]
	}
	testutil.Eventually(t, 10*time.Second, "every placed owner to act", func() bool {
		for app, id := range owners {
			for _, node := range nodes {
				if node.ID() == id {
					if _, ok := node.Elector().Ownership(app); !ok {
						return false
					}
				}
			}
		}
		return true
	})
	return owners
}

func preferred(app int64, nodes []*server.Node, weights map[string]float64) string {
	var ws []coord.Weighted
	for _, n := range nodes {
		w := weights[n.ID()]
		if w == 0 {
			w = 1
		}
		ws = append(ws, coord.Weighted{ID: n.ID(), Weight: w})
	}
	return coord.RankWeighted(app, ws)[0]
}

// Workers all asking the same server (the PowerJob habit) still spread the
// apps: each goes to its preferred server by weight, and acts there.
func TestBalancePlacesAppsOnTheirPreferredServer(t *testing.T) {
	e := testutil.Etcd(t, 1)
	weights := map[string]float64{"a": 1, "b": 1, "c": 2}
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id, func(c *server.Config) { c.Weight = weights[id] }))
	}
	owners := placedOwners(t, nodes[0], nodes, 120)
	count := map[string]int{}
	for app, id := range owners {
		count[id]++
		if want := preferred(app, nodes, weights); id != want {
			t.Errorf("app %d placed on %s, its preferred server is %s", app, id, want)
		}
	}
	t.Logf("apps per server (weights 1,1,2), all asked at a: %v", count)
}

// Balance off: PowerJob's first-come placement, every app on the asked
// server.
func TestBalanceOffIsFirstCome(t *testing.T) {
	e := testutil.Etcd(t, 1)
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id, func(c *server.Config) { c.Balance = false }))
	}
	for app, id := range placedOwners(t, nodes[0], nodes, 30) {
		if id != "a" {
			t.Errorf("app %d placed on %s with Balance off; want the asked server a", app, id)
		}
	}
}

// A cordoned server gets no new app; a preferred server that does not
// answer is skipped for the next by rank; uncordoned, it gets its share
// again.
func TestBalanceSkipsCordonedAndSilentServers(t *testing.T) {
	e := testutil.Etcd(t, 1)
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id))
	}
	a, b, c := nodes[0], nodes[1], nodes[2]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "a to see c cordoned", func() bool {
		rec, ok := a.Elector().Members().Get("c")
		return ok && rec.Cordoned
	})
	for app, id := range placedOwners(t, a, nodes, 45) {
		if id == "c" {
			t.Errorf("app %d placed on the cordoned server c", app)
		}
		if want := preferred(app, nodes[:2], nil); id != want {
			t.Errorf("app %d placed on %s; with c cordoned its preferred server is %s", app, id, want)
		}
	}
	if err := c.Uncordon(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "a to see c uncordoned", func() bool {
		rec, ok := a.Elector().Members().Get("c")
		return ok && !rec.Cordoned
	})
	// b crashes: its membership key lives until its lease expires, but it
	// answers no ping, so its apps-to-be go to the next by rank.
	servertest.Crash(b)
	ranked := map[int64]string{}
	for app, id := range placedOwners(t, a, []*server.Node{a, c}, 45) {
		ranked[app] = id
		if id == "b" {
			t.Errorf("app %d placed on the crashed server b", app)
		}
	}
	onC := 0
	for _, id := range ranked {
		if id == "c" {
			onC++
		}
	}
	if onC == 0 {
		t.Errorf("no app placed on the uncordoned c: %v", ranked)
	}
}

// A weight changed at runtime is in the membership record at once, new
// apps follow it, and /admin/servers shows each server's weight, cordon
// and apps.
func TestSetWeightAndAdminServers(t *testing.T) {
	e := testutil.Etcd(t, 1)
	var nodes []*server.Node
	for _, id := range []string{"a", "b"} {
		nodes = append(nodes, startNode(t, e, id, func(c *server.Config) { c.AdminToken = "t" }))
	}
	a, b := nodes[0], nodes[1]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.SetWeight(ctx, 0); err == nil {
		t.Error("SetWeight(0) accepted: cordon is the way to weigh nothing")
	}
	if err := b.SetWeight(ctx, 3); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "a to see b's weight 3", func() bool {
		rec, ok := a.Elector().Members().Get("b")
		return ok && rec.Weight == 3
	})
	owners := placedOwners(t, a, nodes, 40)
	for app, id := range owners {
		if want := preferred(app, nodes, map[string]float64{"b": 3}); id != want {
			t.Errorf("app %d placed on %s; with b weighing 3 its preferred server is %s", app, id, want)
		}
	}
	r := newWorker(t).do(http.MethodGet, a.Addr(), "/admin/servers", nil, http.Header{"Authorization": {"Bearer t"}})
	var rows []struct {
		ServerID string  `json:"serverId"`
		Weight   float64 `json:"weight"`
		Cordoned bool    `json:"cordoned"`
		Apps     int     `json:"apps"`
	}
	if err := json.Unmarshal(r.data, &rows); err != nil || !r.success || len(rows) != 2 {
		t.Fatalf("/admin/servers: %v %s (%v)", r.success, r.data, err)
	}
	count := map[string]int{}
	for _, id := range owners {
		count[id]++
	}
	for _, row := range rows {
		if row.Apps != count[row.ServerID] || row.ServerID == "b" && row.Weight != 3 || row.ServerID == "a" && row.Weight != 1 {
			t.Errorf("/admin/servers row %+v; owners say %d apps", row, count[row.ServerID])
		}
	}
}
