package integration

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
)

// The scenarios of BenchmarkRebalance, small, as server processes under
// the ownership checker: every app asked for at the first server listed
// (the PowerJob habit), a settle delay of rebalanceSettle and a rate of
// every app a server owns per second. Each asserts no overlap and
// increasing tokens (the checker), every app acted for by its preferred
// server at the end — the first by coord.RankWeighted over the live
// servers' placement weights as etcd lists them — the exact moves the
// scenario allows, counted from the checker's intervals, and the
// workers of a few apps at their owner.

const rebalanceSettle = time.Second

// newRebalanceCluster is a cluster whose nodes balance, with
// rebalanceSettle and a rate of 1.
func newRebalanceCluster(t *testing.T) *cluster {
	c := newCluster(t, ttl)
	c.args = []string{"-rebalance-settle", rebalanceSettle.String(), "-rebalance-rate", "1"}
	return c
}

// placeAt asks p for every app, as workers that list p first do, and
// waits until each has one acting owner.
func (c *cluster) placeAt(p *proc, apps []int64) {
	c.t.Helper()
	for _, app := range apps {
		if _, err := c.acquire(p, app); err != nil {
			c.t.Fatalf("acquire app %d at %s: %v", app, p.id, err)
		}
	}
	if _, err := c.check.waitOwned(apps, "", 10*time.Second); err != nil {
		c.t.Fatal(err)
	}
}

// preferred waits until etcd lists exactly the live servers ids and
// maps each app to its preferred server among them.
func (c *cluster) preferred(apps []int64, ids ...string) map[int64]string {
	c.t.Helper()
	var recs []coord.ServerRecord
	testutil.Eventually(c.t, 2*c.ttl+slack, fmt.Sprintf("live servers %v", ids), func() bool {
		resp, err := c.etcd.Client().Get(context.Background(), c.keys.ServerPrefix(), clientv3.WithPrefix())
		if err != nil {
			return false
		}
		recs = recs[:0]
		for _, kv := range resp.Kvs {
			rec, err := coord.DecodeServerRecord(kv.Value)
			if err != nil {
				c.t.Fatal(err)
			}
			recs = append(recs, rec)
		}
		return len(recs) == len(ids) && !slices.ContainsFunc(recs, func(r coord.ServerRecord) bool { return !slices.Contains(ids, r.ServerID) })
	})
	placement := coord.Placement(recs, "")
	out := make(map[int64]string, len(apps))
	for _, app := range apps {
		out[app] = coord.RankWeighted(app, placement)[0]
	}
	return out
}

// waitPlaced waits until every app of want is acted for by its server
// in want and by no other, and its owner key names that server.
func (c *cluster) waitPlaced(want map[int64]string, timeout time.Duration) {
	c.t.Helper()
	deadline := time.After(timeout)
	for {
		ch := c.check.changes()
		owners := c.check.owners()
		wrong := 0
		for app, s := range want {
			if o := owners[app]; len(o) != 1 || o[0] != s {
				wrong++
			}
		}
		if wrong == 0 {
			break
		}
		select {
		case <-ch:
		case <-deadline:
			c.t.Fatalf("after %v, %d of %d apps are not acted for by their preferred server alone", timeout, wrong, len(want))
		}
	}
	for app, s := range want {
		if id, _ := c.ownerKey(app); id != s {
			c.t.Fatalf("app %d: the checker sees %s acting, its owner key names %q", app, s, id)
		}
	}
}

// watchers starts a worker for each of apps (named app-i by register),
// watching etcd through one shared client.
func (c *cluster) watchers(apps []int64) map[int64]*worker.Discovery {
	c.t.Helper()
	cli := testutil.Client(c.t, c.etcd)
	var servers []string
	for _, p := range c.nodes {
		servers = append(servers, p.public)
	}
	out := map[int64]*worker.Discovery{}
	for i, app := range apps {
		cfg := worker.DefaultConfig()
		cfg.AppName, cfg.Prefix, cfg.Client, cfg.Servers = fmt.Sprintf("app-%d", i), c.prefix, cli, servers
		d, err := worker.New(cfg)
		if err != nil {
			c.t.Fatal(err)
		}
		if err := d.Start(context.Background()); err != nil {
			d.Close()
			c.t.Fatal(err)
		}
		c.t.Cleanup(d.Close)
		if d.AppID() != app {
			c.t.Fatalf("worker of app-%d resolved app %d, want %d", i, d.AppID(), app)
		}
		out[app] = d
	}
	return out
}

// assertWorkersAtOwners waits until every worker points at its app's
// owner in want, with that ownership's token.
func (c *cluster) assertWorkersAtOwners(ws map[int64]*worker.Discovery, want map[int64]string) {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		why := ""
		for app, d := range ws {
			owner, token := c.ownerKey(app)
			cur, _ := d.Current()
			if owner != want[app] || cur.ServerID != owner || cur.Token != token || cur.Address != c.nodes[owner].public {
				why = fmt.Sprintf("app %d: worker at %+v; owner %s, token %d, want %s", app, cur, owner, token, want[app])
				break
			}
		}
		if why == "" {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatal(why)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// assertMoves checks moves against want (app → the server it must move
// to, from the server in from): each app of want moved exactly once,
// there, and nothing else moved.
func assertMoves(t *testing.T, moves []handoff, from, want map[int64]string) {
	t.Helper()
	seen := map[int64]bool{}
	for _, m := range moves {
		switch {
		case seen[m.app]:
			t.Errorf("app %d moved twice (again from %s to %s)", m.app, m.from, m.to)
		case want[m.app] == "":
			t.Errorf("app %d moved from %s to %s; it had no reason to move", m.app, m.from, m.to)
		case m.to != want[m.app] || m.from != from[m.app]:
			t.Errorf("app %d moved from %s to %s; want from %s to %s", m.app, m.from, m.to, from[m.app], want[m.app])
		}
		seen[m.app] = true
	}
	if len(seen) != len(want) {
		t.Errorf("%d apps moved; %d should have", len(seen), len(want))
	}
}

// changed maps each app whose server differs between before and after
// to its server in after.
func changed(before, after map[int64]string) map[int64]string {
	out := map[int64]string{}
	for app, s := range after {
		if before[app] != s {
			out[app] = s
		}
	}
	return out
}

func count(m map[int64]string, server string) int {
	n := 0
	for _, s := range m {
		if s == server {
			n++
		}
	}
	return n
}

// A 4th server joins: after the settle delay, and not before, exactly
// the apps it is now preferred for move to it, once each.
func TestRebalanceJoinMovesTheJoinersShare(t *testing.T) {
	c := newRebalanceCluster(t)
	n1 := c.start("n1")
	c.start("n2")
	c.start("n3")
	apps := c.register(200)
	c.placeAt(n1, apps)
	three := c.preferred(apps, "n1", "n2", "n3")
	c.waitPlaced(three, 10*time.Second)
	ws := c.watchers(apps[:20])

	joining := electiontest.MonoNow() // before n4's membership key exists
	c.start("n4")
	four := c.preferred(apps, "n1", "n2", "n3", "n4")
	c.waitPlaced(four, 30*time.Second)
	moves := c.check.movesAfter(joining)
	assertMoves(t, moves, three, changed(three, four))
	if count(four, "n4") == 0 {
		t.Fatal("n4 is preferred for no app; the test needs some")
	}
	for _, m := range moves {
		if wait := time.Duration(m.start - joining); wait < rebalanceSettle {
			t.Errorf("app %d moved %v after n4 began joining, before the %v settle delay", m.app, wait, rebalanceSettle)
		}
	}
	c.assertWorkersAtOwners(ws, four)
	t.Logf("n4 joined: %d of %d apps moved, n4 preferred for %d", len(moves), len(apps), count(four, "n4"))
	c.assertVerdict()
}

// One of four servers crashes: its apps go to their successors, their
// preferred servers among the three left, and nothing else moves, in
// the settle delay after the takeover or a second beyond it.
func TestRebalanceCrashMovesOnlyTheOrphans(t *testing.T) {
	c := newRebalanceCluster(t)
	n1 := c.start("n1")
	n2 := c.start("n2")
	c.start("n3")
	c.start("n4")
	apps := c.register(200)
	c.placeAt(n1, apps)
	four := c.preferred(apps, "n1", "n2", "n3", "n4")
	c.waitPlaced(four, 10*time.Second)
	ws := c.watchers(apps[:20])

	crashed := electiontest.MonoNow()
	c.kill(n2)
	three := c.preferred(apps, "n1", "n3", "n4")
	c.waitPlaced(three, 2*ttl+slack)
	// An observation window: a rebalance round runs in it, and must
	// find nothing to move.
	<-time.After(rebalanceSettle + time.Second)
	orphans := changed(four, three)
	if len(orphans) != count(four, "n2") || len(orphans) == 0 {
		t.Fatalf("%d apps changed preferred server; n2 owned %d", len(orphans), count(four, "n2"))
	}
	moves := c.check.movesAfter(crashed)
	assertMoves(t, moves, four, orphans)
	c.waitPlaced(three, time.Second)
	c.assertWorkersAtOwners(ws, three)
	t.Logf("n2 crashed: %d orphans, %d moves", len(orphans), len(moves))
	c.assertVerdict()
}

// A rolling deploy, n1,n2,n3 → n4,n5,n6, one at a time: the new server
// joins and takes its share, then an old one is drained (SIGTERM: Close)
// and its apps go to their preferred servers among those left. Each step
// moves exactly the apps whose preferred server changed.
func TestRebalanceRollingDeploy(t *testing.T) {
	c := newRebalanceCluster(t)
	olds := []*proc{c.start("n1"), c.start("n2"), c.start("n3")}
	apps := c.register(150)
	c.placeAt(olds[0], apps)
	live := []string{"n1", "n2", "n3"}
	want := c.preferred(apps, live...)
	c.waitPlaced(want, 10*time.Second)
	ws := c.watchers(apps[:15])

	total := 0
	for i, old := range olds {
		id := fmt.Sprintf("n%d", i+4)
		mark := electiontest.MonoNow()
		c.start(id)
		live = append(live, id)
		joined := c.preferred(apps, live...)
		c.waitPlaced(joined, 30*time.Second)
		moves := c.check.movesAfter(mark)
		assertMoves(t, moves, want, changed(want, joined))
		total += len(moves)

		mark = electiontest.MonoNow()
		old.stop() // SIGTERM: the node drains (Close) and exits
		live = slices.DeleteFunc(live, func(s string) bool { return s == old.id })
		want = c.preferred(apps, live...)
		c.waitPlaced(want, 10*time.Second)
		moves = c.check.movesAfter(mark)
		assertMoves(t, moves, joined, changed(joined, want))
		if len(moves) != count(joined, old.id) {
			t.Errorf("%d apps moved when %s closed; it owned %d", len(moves), old.id, count(joined, old.id))
		}
		total += len(moves)
		t.Logf("step %d: %s joined, %s closed; %d moves so far", i+1, id, old.id, total)
	}
	c.assertWorkersAtOwners(ws, want)
	t.Logf("rolling deploy: %d moves for %d apps (%.2f per app); on n4/n5/n6: %d/%d/%d",
		total, len(apps), float64(total)/float64(len(apps)), count(want, "n4"), count(want, "n5"), count(want, "n6"))
	c.assertVerdict()
}

// Weights 1, 1, 2: every app asked at n1 lands on its preferred server by
// weight — the weight-2 server gets the most — and nothing moves after.
func TestRebalanceWeights(t *testing.T) {
	c := newRebalanceCluster(t)
	c.extra["n3"] = []string{"-weight", "2"}
	n1 := c.start("n1")
	c.start("n2")
	c.start("n3")
	apps := c.register(300)
	want := c.preferred(apps, "n1", "n2", "n3")
	ws := c.watchers(apps[:20])
	placed := electiontest.MonoNow()
	c.placeAt(n1, apps)
	c.waitPlaced(want, 10*time.Second)
	<-time.After(rebalanceSettle + time.Second) // a rebalance round runs in it, and must find nothing to move
	if moves := c.check.movesAfter(placed); len(moves) > 0 {
		t.Errorf("%d apps moved after their placement (first: app %d from %s to %s)", len(moves), moves[0].app, moves[0].from, moves[0].to)
	}
	c.waitPlaced(want, time.Second)
	if n3 := count(want, "n3"); n3 <= count(want, "n1") || n3 <= count(want, "n2") {
		t.Errorf("the weight-2 server is preferred for %d apps, n1 for %d, n2 for %d", n3, count(want, "n1"), count(want, "n2"))
	}
	c.assertWorkersAtOwners(ws, want)
	t.Logf("weights 1,1,2: n1 %d, n2 %d, n3 %d (share %.2f)", count(want, "n1"), count(want, "n2"), count(want, "n3"), float64(count(want, "n3"))/float64(len(apps)))
	c.assertVerdict()
}

// A server that joins and leaves every second for 20 s moves nothing;
// once it stays, its share moves to it after the settle delay and not
// before.
func TestRebalanceIgnoresAFlappingServer(t *testing.T) {
	const settle = 3 * time.Second // longer than the flapper stays
	c := newCluster(t, ttl)
	c.args = []string{"-rebalance-settle", settle.String(), "-rebalance-rate", "1"}
	n1 := c.start("n1")
	c.start("n2")
	c.start("n3")
	apps := c.register(100)
	c.placeAt(n1, apps)
	three := c.preferred(apps, "n1", "n2", "n3")
	c.waitPlaced(three, 10*time.Second)
	ws := c.watchers(apps[:10])

	flapStart := electiontest.MonoNow()
	flaps := 0
	for until := time.Now().Add(20 * time.Second); time.Now().Before(until); flaps++ {
		up := time.Now()
		p := c.start("n4")
		<-time.After(time.Until(up.Add(time.Second))) // it stays a second
		p.stop()
	}
	if moves := c.check.movesAfter(flapStart); len(moves) > 0 {
		t.Fatalf("%d apps moved while n4 flapped %d times (first: app %d from %s to %s)", len(moves), flaps, moves[0].app, moves[0].from, moves[0].to)
	}
	stayed := electiontest.MonoNow()
	c.start("n4")
	four := c.preferred(apps, "n1", "n2", "n3", "n4")
	c.waitPlaced(four, 30*time.Second)
	moves := c.check.movesAfter(flapStart)
	assertMoves(t, moves, three, changed(three, four))
	for _, m := range moves {
		if wait := time.Duration(m.start - stayed); wait < settle {
			t.Errorf("app %d moved %v after n4 came to stay, before the %v settle delay", m.app, wait, settle)
		}
	}
	c.assertWorkersAtOwners(ws, four)
	t.Logf("n4 flapped %d times: nothing moved; once it stayed, %d apps moved to it", flaps, len(moves))
	c.assertVerdict()
}

// Balance off is PowerJob's first-come placement: every app asked at n1
// stays on n1, and a server that joins gets nothing.
func TestBalanceOffIsFirstCome(t *testing.T) {
	c := newRebalanceCluster(t)
	c.args = append(c.args, "-balance=false")
	n1 := c.start("n1")
	c.start("n2")
	c.start("n3")
	apps := c.register(60)
	c.placeAt(n1, apps)
	all := map[int64]string{}
	for _, app := range apps {
		all[app] = "n1"
	}
	c.waitPlaced(all, 10*time.Second)
	joined := electiontest.MonoNow()
	c.start("n4")
	// Balance on would move n4's share within the settle delay.
	<-time.After(rebalanceSettle + 2*time.Second)
	if moves := c.check.movesAfter(joined); len(moves) > 0 {
		t.Errorf("%d apps moved with Balance off (first: app %d from %s to %s)", len(moves), moves[0].app, moves[0].from, moves[0].to)
	}
	c.waitPlaced(all, time.Second)
	c.assertVerdict()
}
