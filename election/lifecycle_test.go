package election_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
)

type countMarker struct{}

// countingClient counts the etcd requests made with a context carrying
// countMarker, whatever other traffic (the session's rounds, watches)
// shares the client.
func countingClient(t *testing.T, count *atomic.Int64) func([]string) *clientv3.Client {
	return func(endpoints []string) *clientv3.Client {
		cfg := coord.ClientConfig(endpoints, testutil.Logger(t))
		cfg.DialOptions = append(cfg.DialOptions,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				if ctx.Value(countMarker{}) != nil {
					count.Add(1)
				}
				return invoker(ctx, method, req, reply, cc, opts...)
			}),
			grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				if ctx.Value(countMarker{}) != nil {
					count.Add(1)
				}
				return streamer(ctx, desc, cc, method, opts...)
			}),
		)
		cli, err := clientv3.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cli.Close() })
		return cli
	}
}

func TestFastPathMakesNoEtcdRequest(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	var count atomic.Int64
	a := c.addNode("a", withClient(countingClient(t, &count)))
	b := c.addNode("b", withClient(countingClient(t, &count)))
	app := c.register(t, "x")[0]
	ctx := context.WithValue(context.Background(), countMarker{}, true)

	// The first election on a does talk to etcd: the counter works.
	if _, err := a.el.Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	if count.Load() == 0 {
		t.Fatal("an election made no counted etcd request; the counter is broken")
	}
	count.Store(0)
	for i := 0; i < 100; i++ {
		addr, err := a.el.Elect(ctx, app, coord.ProtocolHTTP, a.addr)
		if err != nil || addr != a.addr {
			t.Fatalf("fast path: %q, %v", addr, err)
		}
	}
	if n := count.Load(); n != 0 {
		t.Fatalf("100 fast-path elections made %d etcd requests", n)
	}
	// Asking the server that does not own it reads the owner key.
	if addr, err := b.el.Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil || addr != a.addr {
		t.Fatalf("elect on b: %q, %v", addr, err)
	}
	if count.Load() == 0 {
		t.Fatal("a non-owner answered without reading etcd")
	}
}

func TestGuardFiringSuspendsAndTheSameTokenComesBack(t *testing.T) {
	c := newCluster(t, 3, 2*time.Second)
	a := c.addNode("a")
	apps := c.registerN(t, 5)
	electAll(t, c, a, apps)
	tokens := map[int64]int64{}
	for _, app := range apps {
		_, tokens[app] = c.ownerOf(t, app)
	}
	lease := a.session.Lease()

	// Lose quorum: no round can confirm, and etcd cannot expire leases.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	leader, err := c.etcd.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	followers := []int{(leader + 1) % 3, (leader + 2) % 3}
	var wg sync.WaitGroup
	for _, i := range followers {
		wg.Go(func() {
			if err := c.etcd.Stop(i); err != nil {
				t.Error(err)
			}
		})
	}
	if !c.rec.wait(20*time.Second, func([]event) bool { return len(c.rec.owners()) == 0 }) {
		t.Fatalf("guard did not end the ownerships: %v", c.rec.owners())
	}
	if _, err := a.el.Elect(context.Background(), apps[0], coord.ProtocolHTTP, ""); !errors.Is(err, election.ErrNotReady) {
		t.Errorf("Elect while unconfirmed: %v, want ErrNotReady", err)
	}
	if a.el.Healthy() == nil {
		t.Error("Healthy() is nil while holding apps with the lease unconfirmed")
	}
	for _, ev := range c.rec.snapshot() {
		if ev.kind == "lose" && ev.reason != election.ReasonLeaseUnconfirmed {
			t.Errorf("lost app %d for %q, want %q", ev.app, ev.reason, election.ReasonLeaseUnconfirmed)
		}
	}
	wg.Wait()

	resumed := time.Now()
	for _, i := range followers {
		if err := c.etcd.Restart(ctx, i); err != nil {
			t.Fatal(err)
		}
	}
	if !c.rec.wait(20*time.Second, func([]event) bool { return len(a.el.Owned()) == len(apps) }) {
		t.Fatalf("a took back %d of %d apps", len(a.el.Owned()), len(apps))
	}
	if a.session.Lease() != lease {
		t.Fatalf("lease changed across the quorum loss")
	}
	for _, app := range apps {
		owner, token := c.ownerOf(t, app)
		if owner != "a" || token != tokens[app] {
			t.Errorf("app %d: owner %s token %d, want a with the unchanged token %d", app, owner, token, tokens[app])
		}
		if at, ok := acquiredBy(c.rec.snapshot(), "a", app, resumed); !ok {
			t.Errorf("app %d: no new OnAcquire", app)
		} else if tok, _ := a.el.Token(app); tok != tokens[app] {
			t.Errorf("app %d reacquired at %v with token %d", app, at.Sub(resumed), tok)
		}
	}
	if err := a.el.Healthy(); err != nil {
		t.Errorf("Healthy() after recovery: %v", err)
	}
	c.rec.expectClean(t)
}

func TestCloseHandsEverythingOverAndEndsEveryOwnership(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	a := c.addNode("a")
	c.addNode("b")
	apps := c.registerN(t, 20)
	electAll(t, c, a, apps)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.el.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, app := range apps {
		if owner, _ := c.ownerOf(t, app); owner != "b" {
			t.Errorf("app %d owned by %q after a's Close", app, owner)
		}
	}
	loses := 0
	for _, ev := range c.rec.snapshot() {
		if ev.server == "a" && ev.kind == "lose" {
			loses++
			if ev.reason != election.ReasonResigned {
				t.Errorf("app %d lost for %q", ev.app, ev.reason)
			}
		}
	}
	if loses != len(apps) {
		t.Errorf("%d OnLose calls on a, want %d", loses, len(apps))
	}
	if _, err := a.el.Elect(ctx, apps[0], coord.ProtocolHTTP, ""); !errors.Is(err, election.ErrClosed) {
		t.Errorf("Elect after Close: %v", err)
	}
	if err := a.el.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
	c.rec.expectClean(t)
}

// A server that drains moments after a peer handed it an app — before its
// watch has shown the handover — passes the app on instead of leaving it
// named by a server that will never act for it.
func TestDrainJustAfterAHandoverPassesTheAppOn(t *testing.T) {
	c := newCluster(t, 1, 2*time.Second)
	cur := c.addNode("n0")
	app := c.register(t, "x")[0]
	electAll(t, c, cur, []int64{app})
	for i := 1; i <= 10; i++ {
		next := c.addNode(fmt.Sprintf("n%d", i))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := cur.el.Close(ctx) // hands the app to next, the only other server
		cancel()
		if err != nil {
			t.Fatalf("drain of %s: %v", cur.id, err)
		}
		c.nodes = slices.DeleteFunc(c.nodes, func(n *node) bool { return n == cur })
		if owner, _ := c.ownerOf(t, app); owner != next.id {
			t.Fatalf("after %s drained the app is owned by %q, want %s", cur.id, owner, next.id)
		}
		cur = next
	}
	if !c.rec.wait(5*time.Second, func([]event) bool { _, ok := cur.el.Token(app); return ok }) {
		t.Fatalf("%s, the last to be handed the app, is not acting", cur.id)
	}
	c.rec.expectClean(t)
}

func TestConfigValidationNamesTheField(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	n := c.addNode("a")
	for _, tc := range []struct {
		cfg  election.Config
		want string
	}{
		{election.Config{}, "ServerID"},
		{election.Config{ServerID: "x"}, "Control.Address"},
		{election.Config{ServerID: "x", Control: coord.Endpoint{Address: "h:1"}}, "Protocols"},
		{election.Config{ServerID: "x", Control: coord.Endpoint{Address: "h:1"}, Protocols: coord.Protocols{"HTTP": {Address: "h:1"}}, Tuning: election.Tuning{LockTimeout: -time.Second}}, "LockTimeout (-1s)"},
		{election.Config{ServerID: "x", Control: coord.Endpoint{Address: "h:1"}, Protocols: coord.Protocols{"HTTP": {Address: "h:1"}}, Tuning: election.Tuning{RetryTimes: -1}}, "RetryTimes (-1)"},
	} {
		_, err := election.New(context.Background(), n.session, tc.cfg)
		if !errors.Is(err, election.ErrInvalidConfig) || !contains(err.Error(), tc.want) {
			t.Errorf("got %v, want ErrInvalidConfig naming %q", err, tc.want)
		}
	}
}
