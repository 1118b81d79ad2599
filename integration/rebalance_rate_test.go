package integration

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

// TestRebalanceMovesAtItsConfiguredRate: a rebalancing server moves
// apps at the rate it is configured with, not slower. (A token bucket
// whose refill was capped at one tick's worth threw away the fraction of
// an app left after each tick's moves: 19 apps a second configured, 10
// moved.)
//
// Here a, cordoned, owns 95 apps and b joins: all 95 move to b at
// 0.2 × 95 = 19 a second, so the last should move about 94/19 = 4.9 s
// after the first; the bound allows 50% more (a loaded machine), and the
// old bucket took 90% more.
func TestRebalanceMovesAtItsConfiguredRate(t *testing.T) {
	const apps, rate, settle = 95, 0.2, 500 * time.Millisecond
	e := testutil.Etcd(t, 1)
	var mu sync.Mutex
	var moved []time.Time // b's acquisitions
	start := func(id string) *server.Node {
		cfg := server.DefaultConfig()
		cfg.Client = testutil.Client(t, e)
		cfg.Prefix, cfg.ServerID, cfg.TTL, cfg.Listen = prefix, id, ttl, "127.0.0.1:0"
		cfg.Election.RebalanceSettle, cfg.Election.RebalanceRate = settle, rate
		cfg.Logger = testutil.Logger(t).Named(id)
		if id == "b" {
			cfg.Callbacks = election.Callbacks{OnAcquire: func(context.Context, int64, int64) {
				mu.Lock()
				moved = append(moved, time.Now())
				mu.Unlock()
			}}
		}
		n, err := server.NewNode(cfg)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			n.Close(ctx)
		})
		return n
	}
	a := start("a")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range apps {
		app, err := a.Registry().Register(ctx, fmt.Sprintf("rate-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 10*time.Second, "a acting for every app", func() bool { return len(a.Elector().Owned()) == apps })
	// Cordoned and alone, a keeps its apps: there is nowhere to move them.
	if err := a.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	b := start("b")
	testutil.Eventually(t, 60*time.Second, "every app on b", func() bool { return len(b.Elector().Owned()) == apps })
	mu.Lock()
	took := moved[len(moved)-1].Sub(moved[0])
	mu.Unlock()
	perSecond := rate * float64(apps)
	want := time.Duration(float64(apps-1) / perSecond * float64(time.Second))
	if took > want*3/2 {
		t.Errorf("the last of %d apps moved %v after the first; at %.0f apps a second (%.0f%% of %d) that takes %v",
			apps, took, perSecond, rate*100, apps, want)
	}
	t.Logf("%d apps moved in %v (%.1f a second; the rate allows %.0f)", apps, took, float64(apps-1)/took.Seconds(), perSecond)
}
