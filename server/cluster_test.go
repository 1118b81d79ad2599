package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

func acquire(t *testing.T, w *worker, base string, app int64) string {
	t.Helper()
	r := w.get(base, "/server/acquire", url.Values{"appId": {strconv.FormatInt(app, 10)}, "protocol": {"HTTP"}})
	var addr string
	if !r.success || json.Unmarshal(r.data, &addr) != nil {
		t.Fatalf("acquire on %s: %d %v %q %s", base, r.status, r.success, r.message, r.data)
	}
	return addr
}

func TestThreeNodesAgreeAndCloseHandsTheAppOver(t *testing.T) {
	e := testutil.Etcd(t, 1)
	nodes := map[string]*server.Node{}
	for _, id := range []string{"s1", "s2", "s3"} {
		nodes[id] = startNode(t, e, id)
	}
	ctx := context.Background()
	app, _ := nodes["s1"].Registry().Register(ctx, "orders")
	w := newWorker(t)

	first := acquire(t, w, nodes["s2"].Addr(), app.ID)
	for _, id := range []string{"s1", "s2", "s3"} {
		if got := acquire(t, w, nodes[id].Addr(), app.ID); got != first {
			t.Fatalf("%s says %s, s2 said %s", id, got, first)
		}
	}
	var owner *server.Node
	var others []string
	for id, n := range nodes {
		if n.Addr() == first {
			owner = n
		} else {
			others = append(others, id)
		}
	}
	successor, _ := coord.Successor(app.ID, others)

	closeCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := owner.Close(closeCtx); err != nil {
		t.Fatal(err)
	}
	for _, id := range others {
		if got := acquire(t, w, nodes[id].Addr(), app.ID); got != nodes[successor].Addr() {
			t.Fatalf("after closing the owner, %s says %s, successor %s is at %s", id, got, successor, nodes[successor].Addr())
		}
	}
	// The closed node left nothing of its own in etcd.
	key, _ := keyspace.New("")
	srvKey, _ := key.Server(owner.ID())
	if resp, _ := e.Client().Get(ctx, srvKey); len(resp.Kvs) != 0 {
		t.Error("closed node's membership key survived")
	}
	resp, _ := e.Client().Get(ctx, "/baton/", clientv3.WithPrefix())
	for _, kv := range resp.Kvs {
		if kv.Lease == int64(owner.Session().Lease()) {
			t.Errorf("key %s still bound to the closed node's lease", kv.Key)
		}
	}
	// Its HTTP server is gone.
	if _, err := http.Get("http://" + owner.Addr() + "/server/hello"); err == nil {
		t.Error("closed node still answers HTTP")
	}
}

func TestAdminRoutesNeedTheToken(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", func(c *server.Config) { c.AdminToken = "s3cret" })
	plain := startNode(t, e, "s2")
	w := newWorker(t)
	bearer := func(tok string) http.Header { return http.Header{"Authorization": {"Bearer " + tok}} }

	for _, h := range []http.Header{nil, bearer("wrong"), bearer(""), bearer("s3cret2"), bearer("s3cre"), {"Authorization": {"s3cret"}}, {"Authorization": {"Basic s3cret"}}} {
		r := w.do(http.MethodPost, n.Addr(), "/admin/apps", url.Values{"appName": {"x"}}, h)
		if r.status != http.StatusUnauthorized || r.success {
			t.Errorf("token %v: %d %v", h, r.status, r.success)
		}
	}
	if _, err := n.Registry().ByName(context.Background(), "x"); !errors.Is(err, coord.ErrUnknownApp) {
		t.Fatalf("a refused request registered the app: %v", err)
	}
	r := w.do(http.MethodPost, n.Addr(), "/admin/apps", url.Values{"appName": {"x"}}, bearer("s3cret"))
	var info struct {
		AppID int64 `json:"appId"`
	}
	if json.Unmarshal(r.data, &info); !r.success || info.AppID <= 0 {
		t.Fatalf("register with token: %v %s", r.success, r.data)
	}
	acquire(t, w, n.Addr(), info.AppID)
	r = w.do(http.MethodGet, n.Addr(), "/admin/owners", nil, bearer("s3cret"))
	var owners []struct {
		AppID    int64  `json:"appId"`
		ServerID string `json:"serverId"`
		Token    int64  `json:"token"`
	}
	if json.Unmarshal(r.data, &owners); !r.success || len(owners) != 1 || owners[0].AppID != info.AppID || owners[0].Token <= 0 {
		t.Fatalf("owners: %v %s", r.success, r.data)
	}
	owner := owners[0].ServerID
	if owner == "s1" {
		r = w.do(http.MethodPost, n.Addr(), "/admin/handover", url.Values{"appId": {strconv.FormatInt(info.AppID, 10)}}, bearer("s3cret"))
		if !r.success || !jsonHas(r.data, "newOwner", "s2") {
			t.Fatalf("handover: %v %q %s", r.success, r.message, r.data)
		}
	}
	// Without a token configured, the routes do not exist.
	if r := w.do(http.MethodGet, plain.Addr(), "/admin/owners", nil, bearer("s3cret")); r.status != http.StatusNotFound {
		t.Errorf("admin route on a node without a token: %d", r.status)
	}
	r = w.do(http.MethodPost, n.Addr(), "/admin/drain", nil, bearer("s3cret"))
	if !r.success {
		t.Fatalf("drain: %q", r.message)
	}
	if len(n.Elector().Owned()) != 0 {
		t.Fatal("drained node still owns apps")
	}
}

func jsonHas(raw json.RawMessage, key, want string) bool {
	var m map[string]any
	json.Unmarshal(raw, &m)
	return m[key] == want
}

func TestConfigErrorsNameTheField(t *testing.T) {
	e := testutil.Etcd(t, 1)
	for _, tc := range []struct {
		cfg  server.Config
		want string
	}{
		{server.Config{}, "Client is nil"},
		{server.Config{Client: e.Client(), Listen: ":0", Prefix: "nope"}, "Prefix (\"nope\")"},
		{server.Config{Client: e.Client(), Listen: ":0", ServerID: "a\nb"}, "ServerID"},
		{server.Config{Client: e.Client()}, "Control.Address and Listen are empty"},
		{server.Config{Client: e.Client(), Control: coord.Endpoint{Address: "nohost"}}, "Control.Address (\"nohost\")"},
		{server.Config{Client: e.Client(), Listen: ":0", Protocols: coord.Protocols{"AKKA": {}}}, "Protocols"},
		{server.Config{Client: e.Client(), Listen: ":0", TTL: 300 * time.Millisecond}, "TTL (300ms)"},
		{server.Config{Client: e.Client(), Listen: ":0", TTL: 1500 * time.Millisecond}, "TTL (1.5s)"},
		{server.Config{Client: e.Client(), Listen: ":0", Election: election.Tuning{RetryTimes: -1}}, "RetryTimes (-1)"},
	} {
		// One sentinel for every package: errors.Is works whichever name
		// the caller knows it by.
		_, err := server.NewNode(tc.cfg)
		for _, sentinel := range []error{server.ErrInvalidConfig, coord.ErrInvalidConfig, election.ErrInvalidConfig} {
			if !errors.Is(err, sentinel) || !contains(err.Error(), tc.want) {
				t.Errorf("NewNode: %v, want %v naming %q", err, sentinel, tc.want)
			}
		}
	}
}

// Before Start, a node's elector is nil and safe to use: actions answer
// ErrNotReady, queries nothing.
func TestElectorBeforeStartAnswersNotReady(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cfg := server.DefaultConfig()
	cfg.Client, cfg.Listen = e.Client(), "127.0.0.1:0"
	n, err := server.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	el := n.Elector()
	if _, err := el.Elect(context.Background(), 1, coord.ProtocolHTTP, ""); !errors.Is(err, election.ErrNotReady) {
		t.Errorf("Elect before Start: %v, want ErrNotReady", err)
	}
	if _, err := el.HandOver(context.Background(), 1); !errors.Is(err, election.ErrNotReady) {
		t.Errorf("HandOver before Start: %v, want ErrNotReady", err)
	}
	if err := el.Resign(context.Background(), 1); !errors.Is(err, election.ErrNotReady) {
		t.Errorf("Resign before Start: %v, want ErrNotReady", err)
	}
	if _, err := el.Fence(1); err == nil {
		t.Error("Fence before Start succeeded")
	}
	if len(el.Owned()) != 0 || el.Members() != nil {
		t.Error("a node that has not started owns something or has members")
	}
}
