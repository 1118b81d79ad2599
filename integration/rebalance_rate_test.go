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

// TestRebalanceMovesAtItsConfiguredRate — KNOWN FAILING, a bug in the
// rebalancer (found by BenchmarkRebalance/join, which misses its
// "balanced within settle + 10,000/4 ÷ rate" target by the same cause).
//
// A round's token bucket (election/rebalance.go:119-142) refills by
// perSecond×100 ms per tick but is capped at that same amount
// (max(1, perSecond×0.1)), and a move takes only whole tokens: the
// fraction left after a move is thrown away at the next tick. A server
// that may move 19 apps a second (95 apps at 20%/s) gets 1.9 tokens a
// tick, moves 1 app and keeps 0.9, which the next tick's cap cuts back
// to 1.9: one app per tick, 10 a second, 53% of its rate. At the
// default 2%/s and 3,333 apps (66.7/s) it moves 6 a tick, 60/s: 10%
// short, which is what the join benchmark measures.
//
// Here a, cordoned, owns 95 apps and b joins: all 95 move to b at
// 0.2 × 95 = 19 a second, so the last should move about 94/19 = 4.9 s
// after the first; the bound allows 25% more.
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
	if took > want*5/4 {
		t.Errorf("the last of %d apps moved %v after the first; at %.0f apps a second (%.0f%% of %d) that takes %v",
			apps, took, perSecond, rate*100, apps, want)
	}
	t.Logf("%d apps moved in %v (%.1f a second; the rate allows %.0f)", apps, took, float64(apps-1)/took.Seconds(), perSecond)
}
