package server_test

// Attempts to break rebalancing through server.Node (Balance on): the
// rate limit, cordon toggles during a round, a drain concurrent with a
// round, and a target that crashes while apps move to it.

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// BREAK: the rate limit does not hold while the cordoned server's
// membership record is rewritten without a change of placement — a
// cordon applied again, as an operator's script or a preStop hook that
// ensures the cordon does. Every rewrite closes Members.Changed without
// touching Members.Stable's time, so rebalanceRound returns, and
// rebalanceLoop starts a new round at once, with a fresh token: one more
// app moves per rewrite, whatever the rate.
func TestBreakRebalanceRateHoldsWhileTheCordonIsReapplied(t *testing.T) {
	for _, every := range []time.Duration{100 * time.Millisecond, 300 * time.Millisecond} {
		t.Run("every "+every.String(), func(t *testing.T) { rateWithCordonReapplied(t, every) })
	}
}

func rateWithCordonReapplied(t *testing.T, every time.Duration) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	const settle, rate = time.Second, 0.02 // c's ~20 apps: 1 app/s
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id, acq.rebalancing(id, settle, rate)))
	}
	c := nodes[2]
	placedOwners(t, nodes[0], nodes, 60)
	onC := len(c.Elector().Owned())
	if onC < 8 {
		t.Fatalf("c owns %d apps; the test needs more", onC)
	}
	mark := acq.settled(t, 60)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	// Re-apply the cordon every so often for 4 s after the first move.
	testutil.Eventually(t, 20*time.Second, "the first move off c", func() bool { return acq.len() > mark })
	first := acq.since(mark)[0].at
	const window = 4 * time.Second
	tick := time.NewTicker(every)
	for time.Since(first) < window {
		<-tick.C
		if err := c.Cordon(ctx); err != nil {
			t.Fatal(err)
		}
	}
	tick.Stop()
	perSecond := max(1, rate*float64(onC))
	var within int
	for _, m := range acq.since(mark) {
		if m.at.Sub(first) <= window {
			within++
		}
	}
	allowed := 1 + perSecond*(window.Seconds()+0.1)
	t.Logf("%d of c's %d apps moved in the %v after the first move; the rate allows %.1f", within, onC, window, allowed)
	if float64(within) > allowed+0.5 {
		t.Errorf("%d apps moved within %v of the first; the rate (%.1f/s) allows %.1f", within, window, perSecond, allowed)
	}
}

// PIN: cordon toggles of the target during a round. c, cordoned, moves its
// apps away while a is cordoned and uncordoned again and again. Every app
// ends acting on exactly one server, which is its preferred one once the
// toggling stops, and nobody acted twice at once (checked per node by the
// recorder's ctx stamps: a node never acquires an app another acts for).
func TestBreakRebalanceTogglingCordonsDuringARoundEndsBalanced(t *testing.T) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	ov := newOverlaps()
	const settle, rate = 500 * time.Millisecond, 1.0
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c", "d"} {
		nodes = append(nodes, startNode(t, e, id, acq.rebalancing(id, settle, rate), ov.watching(id)))
	}
	a, c := nodes[0], nodes[2]
	owners := placedOwners(t, nodes[1], nodes, 80)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	if err := c.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "c's first move", func() bool { return len(c.Elector().Owned()) < 20 })
	for i := range 12 {
		var err error
		if i%2 == 0 {
			err = a.Cordon(ctx)
		} else {
			err = a.Uncordon(ctx)
		}
		if err != nil {
			t.Fatal(err)
		}
		<-time.After(time.Duration(100+i*70) * time.Millisecond) // toggles that straddle the settle delay
	}
	testutil.Eventually(t, 30*time.Second, "every app on its preferred server, c cordoned", func() bool {
		return balanced(owners, nodes, map[string]float64{"c": -1})
	})
	ov.expectClean(t)
}

// PIN: a drain of the source during a round loses nothing. 150 apps on a
// and b; d joins and they start moving d's share at full rate; a is
// closed in the middle of it. Every app ends up acting on exactly one
// server and no two servers act for an app at once.
func TestBreakRebalanceDrainOfTheSourceMidRound(t *testing.T) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	ov := newOverlaps()
	const settle, rate = 500 * time.Millisecond, 0.2
	var nodes []*server.Node
	for _, id := range []string{"a", "b"} {
		nodes = append(nodes, startNode(t, e, id, acq.rebalancing(id, settle, rate), ov.watching(id)))
	}
	owners := placedOwners(t, nodes[0], nodes, 150)
	mark := acq.settled(t, len(owners))
	d := startNode(t, e, "d", acq.rebalancing("d", settle, rate), ov.watching("d"))
	testutil.Eventually(t, 20*time.Second, "a few moves to d", func() bool { return len(acq.since(mark)) >= 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := nodes[0].Close(ctx); err != nil {
		t.Errorf("closing a mid-round: %v", err)
	}
	left := []*server.Node{nodes[1], d}
	testutil.Eventually(t, 30*time.Second, "every app on its preferred server of b and d", func() bool {
		return balanced(owners, left, nil)
	})
	ov.expectClean(t)
}

// PIN: the target crashes while apps move to it. d joins; right after its
// first app arrives it crashes (lease left to expire). The apps given to d
// act elsewhere within TTL + 1 s of the lease's end, nobody overlaps, and
// every app ends acting on its preferred live server.
func TestBreakRebalanceTargetCrashesWhileAppsMoveToIt(t *testing.T) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	ov := newOverlaps()
	const settle, rate = 500 * time.Millisecond, 1.0
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id, acq.rebalancing(id, settle, rate), ov.watching(id)))
	}
	owners := placedOwners(t, nodes[0], nodes, 90)
	mark := acq.settled(t, len(owners))
	d := startNode(t, e, "d", acq.rebalancing("d", settle, rate), ov.watching("d"))
	testutil.Eventually(t, 20*time.Second, "d's first app", func() bool { return len(acq.since(mark)) >= 1 })
	servertest.Crash(d)
	testutil.Eventually(t, 30*time.Second, "every app on its preferred server of a, b, c", func() bool {
		return balanced(owners, nodes, nil)
	})
	ov.expectClean(t)
}

// overlaps records every node's ownership intervals — from OnAcquire to
// the end stamp of its ctx (electiontest.EndedAt) — and reports any two
// nodes' intervals of one app that overlap, and tokens that go backwards.
type overlaps struct {
	mu   sync.Mutex
	ivs  map[int64][]*interval
	wg   sync.WaitGroup
	bugs []string
}

type interval struct {
	server     string
	token      int64
	start, end time.Time
}

func newOverlaps() *overlaps { return &overlaps{ivs: map[int64][]*interval{}} }

// watching chains onto the node's callbacks (set them first).
func (o *overlaps) watching(id string) func(*server.Config) {
	return func(c *server.Config) {
		prev := c.Callbacks.OnAcquire
		c.Callbacks.OnAcquire = func(ctx context.Context, app, token int64) {
			iv := &interval{server: id, token: token, start: time.Now()}
			if prev != nil {
				prev(ctx, app, token)
			}
			o.mu.Lock()
			o.ivs[app] = append(o.ivs[app], iv)
			o.mu.Unlock()
			o.wg.Go(func() {
				<-ctx.Done()
				at, ok := electiontest.EndedAt(ctx)
				o.mu.Lock()
				defer o.mu.Unlock()
				if !ok {
					o.bugs = append(o.bugs, fmt.Sprintf("%s: app %d ownership %d ended without an end stamp", id, app, token))
					at = time.Now()
				}
				iv.end = at
			})
		}
	}
}

// expectClean reports every overlap of two servers' intervals of one app,
// and every token lower than an earlier one of another server.
func (o *overlaps) expectClean(t *testing.T) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, b := range o.bugs {
		t.Error(b)
	}
	for app, ivs := range o.ivs {
		for i, x := range ivs {
			for _, y := range ivs[i+1:] {
				if x.server == y.server {
					continue
				}
				xe, ye := x.end, y.end
				if xe.IsZero() {
					xe = time.Now()
				}
				if ye.IsZero() {
					ye = time.Now()
				}
				if x.start.Before(ye) && y.start.Before(xe) {
					t.Errorf("app %d: %s (token %d, %s–%s) and %s (token %d, %s–%s) overlap", app,
						x.server, x.token, x.start.Format("15:04:05.000000"), xe.Format("15:04:05.000000"),
						y.server, y.token, y.start.Format("15:04:05.000000"), ye.Format("15:04:05.000000"))
				}
			}
		}
		nonEmpty := slices.DeleteFunc(slices.Clone(ivs), func(iv *interval) bool { return !iv.end.IsZero() && !iv.end.After(iv.start) })
		for i := 1; i < len(nonEmpty); i++ {
			if nonEmpty[i].token < nonEmpty[i-1].token {
				t.Errorf("app %d: token %d (%s) after %d (%s)", app, nonEmpty[i].token, nonEmpty[i].server, nonEmpty[i-1].token, nonEmpty[i-1].server)
			}
		}
	}
}
