package election_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
)

func TestConcurrentElectionsGiveOneOwnerPerApp(t *testing.T) {
	// 4,000 concurrent elections load a 2-core machine (and the in-process
	// etcd) hard, more so under the race detector; the default TTL keeps
	// the guards confirmed through it. What is tested here is one owner
	// per app, not the guard under overload.
	c := newCluster(t, 1, 5*time.Second)
	for _, id := range []string{"s1", "s2", "s3"} {
		c.addNode(id)
	}
	apps := c.registerN(t, 200)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	answers := make(map[int64]map[string]int)
	var notReady atomic.Int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, app := range apps {
		for i := 0; i < 20; i++ {
			n := c.nodes[i%len(c.nodes)]
			wg.Go(func() {
				addr, err := n.el.Elect(ctx, app, coord.ProtocolHTTP, "")
				// Under this load (more so with -race on 2 cores) etcd
				// applies writes late and a keepalive can wait seconds for
				// it, so a guard may fire and a server answer ErrNotReady
				// for a moment: a worker would ask again, and so do we.
				for errors.Is(err, election.ErrNotReady) && ctx.Err() == nil {
					notReady.Add(1)
					time.Sleep(50 * time.Millisecond)
					addr, err = n.el.Elect(ctx, app, coord.ProtocolHTTP, "")
				}
				if err != nil {
					t.Errorf("elect app %d on %s: %v", app, n.id, err)
					return
				}
				mu.Lock()
				defer mu.Unlock()
				if answers[app] == nil {
					answers[app] = map[string]int{}
				}
				answers[app][addr]++
			})
		}
	}
	wg.Wait()
	t.Logf("ErrNotReady answers retried: %d", notReady.Load())

	for _, app := range apps {
		if len(answers[app]) != 1 {
			t.Errorf("app %d: callers got different addresses: %v", app, answers[app])
		}
		owner, token := c.ownerOf(t, app)
		for addr := range answers[app] {
			if addr != owner+":7700" {
				t.Errorf("app %d: callers told %s, owner key names %s", app, addr, owner)
			}
		}
		if tok, ok := c.node(owner).el.Token(app); !ok || tok != token {
			t.Errorf("app %d: owner %s has token %d (%v), key has %d", app, owner, tok, ok, token)
		}
	}
	if !c.rec.wait(5*time.Second, func([]event) bool { return len(c.rec.owners()) == len(apps) }) {
		t.Fatalf("%d apps have an acquired owner, want %d", len(c.rec.owners()), len(apps))
	}
	for app, servers := range c.rec.owners() {
		if len(servers) != 1 {
			t.Errorf("app %d acquired by %v", app, servers)
		}
	}
	// Apps spread over the servers (each server elected itself for the
	// apps it was asked about first).
	perServer := map[string]int{}
	for _, servers := range c.rec.owners() {
		perServer[servers[0]]++
	}
	t.Logf("apps per server: %v", perServer)

	// Move every app once (resign; the successor takes it): tokens must
	// strictly increase across the change.
	for _, app := range apps[:50] {
		owner, _ := c.ownerOf(t, app)
		if _, err := c.node(owner).el.HandOver(ctx, app); err != nil {
			t.Fatalf("hand over app %d: %v", app, err)
		}
	}
	c.rec.expectClean(t)
}

func TestElectRejectsBadRequests(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	n := c.addNode("s1")
	app := c.register(t, "known")[0]
	ctx := context.Background()
	if _, err := n.el.Elect(ctx, app+100, coord.ProtocolHTTP, ""); !errors.Is(err, election.ErrUnknownApp) {
		t.Errorf("unknown app: %v", err)
	}
	if _, err := n.el.Elect(ctx, -1, coord.ProtocolHTTP, ""); !errors.Is(err, election.ErrUnknownApp) {
		t.Errorf("negative app: %v", err)
	}
	if _, err := n.el.Elect(ctx, app, "CARRIER-PIGEON", ""); !errors.Is(err, election.ErrProtocol) {
		t.Errorf("unknown protocol: %v", err)
	}
	if owner, _ := c.ownerOf(t, app); owner != "" {
		t.Errorf("bad requests elected %s", owner)
	}
}

// An unknown app id asked for again and again costs one etcd read per
// second of memory, not one per request; once registered, the app is
// found within that second.
func TestUnknownAppsAreAnsweredFromMemoryBriefly(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	var count atomic.Int64
	n := c.addNode("s1", withClient(countingClient(t, &count)))
	c.register(t, "known")
	ctx := context.WithValue(context.Background(), countMarker{}, true)
	const unknown = 77
	start := time.Now()
	for range 100 {
		if _, err := n.el.Elect(ctx, unknown, coord.ProtocolHTTP, ""); !errors.Is(err, election.ErrUnknownApp) {
			t.Fatalf("unknown app: %v", err)
		}
	}
	// One read per second of elapsed time at most (a slow machine may
	// cross a second boundary).
	if most := 1 + int64(time.Since(start)/time.Second); count.Load() > most {
		t.Errorf("100 Elects of an unknown app made %d etcd requests in %v; want at most %d", count.Load(), time.Since(start), most)
	}
	if ids := c.registerN(t, unknown-1); ids[len(ids)-1] != unknown {
		t.Fatalf("registered up to id %d, want %d", ids[len(ids)-1], unknown)
	}
	testutil.Eventually(t, 3*time.Second, "the newly registered app to be found", func() bool {
		_, err := n.el.Elect(ctx, unknown, coord.ProtocolHTTP, "")
		return err == nil
	})
}
