package server_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
)

// acquisitions records every OnAcquire of every node, in order.
type acquisitions struct {
	mu   sync.Mutex
	log  []acquired
	lost map[string]int // reason → count
}

type acquired struct {
	app    int64
	server string
	at     time.Time
}

// rebalancing is a node config that rebalances after settle, at rate,
// and records acquisitions in acq.
func (acq *acquisitions) rebalancing(id string, settle time.Duration, rate float64) func(*server.Config) {
	return func(c *server.Config) {
		c.Election.RebalanceSettle = settle
		c.Election.RebalanceRate = rate
		c.Callbacks = election.Callbacks{
			OnAcquire: func(_ context.Context, app, _ int64) {
				acq.mu.Lock()
				defer acq.mu.Unlock()
				acq.log = append(acq.log, acquired{app: app, server: id, at: time.Now()})
			},
			OnLose: func(_ int64, _ int64, reason election.Reason) {
				acq.mu.Lock()
				defer acq.mu.Unlock()
				if acq.lost == nil {
					acq.lost = map[string]int{}
				}
				acq.lost[string(reason)]++
			},
		}
	}
}

// since returns the acquisitions from index i on.
func (acq *acquisitions) since(i int) []acquired {
	acq.mu.Lock()
	defer acq.mu.Unlock()
	return append([]acquired(nil), acq.log[i:]...)
}

// settled waits until n acquisitions are recorded (OnAcquire runs just
// after an ownership starts acting) and returns n: the mark after which
// acquisitions are new.
func (acq *acquisitions) settled(t *testing.T, n int) int {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, "every acquisition's callback", func() bool { return acq.len() >= n })
	return n
}

func (acq *acquisitions) len() int {
	acq.mu.Lock()
	defer acq.mu.Unlock()
	return len(acq.log)
}

// balanced reports whether every app in owners is owned and acted for by
// its preferred server among nodes, and none by another node.
func balanced(owners map[int64]string, nodes []*server.Node, weights map[string]float64) bool {
	for app := range owners {
		want := preferred(app, nodes, weights)
		for _, n := range nodes {
			_, ok := n.Elector().Ownership(app)
			if ok != (n.ID() == want) {
				return false
			}
		}
	}
	return true
}

// A server that joins gets, once the set has been stable for the settle
// delay and not before, exactly the apps it is now preferred for; every
// other app stays where it was, and nothing moves twice.
func TestRebalanceMovesOnlyTheJoinersShare(t *testing.T) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	const settle = 2 * time.Second
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id, acq.rebalancing(id, settle, 1)))
	}
	owners := placedOwners(t, nodes[0], nodes, 80)
	mark := acq.settled(t, len(owners))
	joining := time.Now() // before d's membership key exists
	nodes = append(nodes, startNode(t, e, "d", acq.rebalancing("d", settle, 1)))
	testutil.Eventually(t, 30*time.Second, "every app on its preferred server of four", func() bool {
		return balanced(owners, nodes, nil)
	})
	want := 0
	for app := range owners {
		if preferred(app, nodes, nil) == "d" {
			want++
		}
	}
	acq.settled(t, mark+want) // the last move's OnAcquire runs just after it acts
	moves := acq.since(mark)
	seen := map[int64]bool{}
	for _, m := range moves {
		if m.server != "d" {
			t.Errorf("app %d moved to %s; only the joiner d gains apps", m.app, m.server)
		}
		if seen[m.app] {
			t.Errorf("app %d moved twice", m.app)
		}
		seen[m.app] = true
		if wait := m.at.Sub(joining); wait < settle {
			t.Errorf("app %d moved %v after d started joining, before the %v settle delay", m.app, wait, settle)
		}
	}
	if len(moves) != want || want == 0 {
		t.Errorf("%d apps moved; d is preferred for %d of %d", len(moves), want, len(owners))
	}
	acq.mu.Lock()
	if acq.lost[string(election.ReasonRebalanced)] != want {
		t.Errorf("OnLose reasons %v; want %d rebalanced", acq.lost, want)
	}
	acq.mu.Unlock()
	t.Logf("d joined: %d of %d apps moved (%.2f of the minimum %d/4)", len(moves), len(owners), float64(len(moves))/(float64(len(owners))/4), len(owners))
}

// A server that keeps joining and leaving moves nothing; once it stays
// for the settle delay it gets its share.
func TestRebalanceIgnoresAFlappingServer(t *testing.T) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	const settle = 3 * time.Second
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id, acq.rebalancing(id, settle, 1)))
	}
	owners := placedOwners(t, nodes[0], nodes, 60)
	mark := acq.settled(t, len(owners))
	flapUntil := time.Now().Add(2 * settle)
	for time.Now().Before(flapUntil) {
		f := startNode(t, e, "f", acq.rebalancing("f", settle, 1)) // its cleanup's Close is a no-op
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := f.Close(ctx); err != nil {
			t.Errorf("closing the flapping server: %v", err)
		}
		cancel()
	}
	if moves := acq.since(mark); len(moves) != 0 {
		t.Fatalf("%d apps moved while f flapped (first: app %d to %s)", len(moves), moves[0].app, moves[0].server)
	}
	stayed := time.Now()
	nodes = append(nodes, startNode(t, e, "f", acq.rebalancing("f", settle, 1)))
	testutil.Eventually(t, 30*time.Second, "f's share on f once it stays", func() bool {
		return balanced(owners, nodes, nil)
	})
	for _, m := range acq.since(mark) {
		if m.at.Sub(stayed) < settle {
			t.Errorf("app %d moved to %s %v after f came to stay, before the settle delay", m.app, m.server, m.at.Sub(stayed))
		}
	}
}

// A cordoned server's apps move to their next preferred servers, no
// faster than the rate allows; uncordoned, it gets them back.
func TestCordonMovesAppsAwayAtTheRate(t *testing.T) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	const settle, rate = time.Second, 0.2
	var nodes []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes = append(nodes, startNode(t, e, id, acq.rebalancing(id, settle, rate)))
	}
	a, c := nodes[0], nodes[2]
	owners := placedOwners(t, a, nodes, 60)
	onC := len(c.Elector().Owned())
	if onC < 5 {
		t.Fatalf("c owns %d apps; the test needs a few", onC)
	}
	mark := acq.settled(t, len(owners))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "every app off the cordoned c", func() bool {
		return balanced(owners, nodes, map[string]float64{"c": -1}) // weight ≤ 0 ranks last, as a cordon
	})
	acq.settled(t, mark+onC) // the last move's OnAcquire runs just after it acts
	moves := acq.since(mark)
	if len(moves) != onC {
		t.Errorf("%d apps moved; c owned %d", len(moves), onC)
	}
	// At most one app at once, then rate×onC per second (at least 1),
	// spread in 100 ms ticks.
	perSecond := max(1, rate*float64(onC))
	first := moves[0].at
	for i, m := range moves {
		if m.server == "c" {
			t.Errorf("app %d moved to the cordoned c", m.app)
		}
		allowed := 1 + perSecond*(m.at.Sub(first).Seconds()+0.1)
		if float64(i+1) > allowed+0.5 { // OnAcquire runs just after the write
			t.Errorf("%d apps moved within %v of the first; the rate allows %.1f", i+1, m.at.Sub(first), allowed)
			break
		}
	}
	t.Logf("%d apps moved off c in %v at %.1f/s allowed", len(moves), moves[len(moves)-1].at.Sub(first), perSecond)

	mark = acq.settled(t, len(owners)+onC)
	if err := c.Uncordon(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "c's apps back on c", func() bool {
		return balanced(owners, nodes, nil)
	})
	acq.settled(t, mark+onC)
	if back := acq.since(mark); len(back) != onC {
		t.Errorf("%d apps moved back to the uncordoned c; it is preferred for %d", len(back), onC)
	}
}

// Balance off never moves an app: the same join that moves the joiner's
// share with Balance on moves nothing.
func TestBalanceOffNeverRebalances(t *testing.T) {
	e := testutil.Etcd(t, 1)
	acq := &acquisitions{}
	const settle = 500 * time.Millisecond
	off := func(id string) func(*server.Config) {
		return func(c *server.Config) {
			acq.rebalancing(id, settle, 1)(c)
			c.Balance = false
		}
	}
	var nodes []*server.Node
	for _, id := range []string{"a", "b"} {
		nodes = append(nodes, startNode(t, e, id, off(id)))
	}
	owners := placedOwners(t, nodes[0], nodes, 30)
	mark := acq.settled(t, len(owners))
	d := startNode(t, e, "d", off("d"))
	// A node with Balance on, joining the same set, would rebalance
	// within the settle delay; give it ten times that.
	<-time.After(10 * settle) // an observation window: nothing may happen in it
	if moves := acq.since(mark); len(moves) > 0 {
		t.Fatalf("app %d moved to %s with Balance off", moves[0].app, moves[0].server)
	}
	if n := len(d.Elector().Owned()); n != 0 {
		t.Errorf("the joiner owns %d apps with Balance off", n)
	}
	for app, id := range owners {
		if id != "a" {
			t.Errorf("app %d on %s with Balance off; first-come puts it on a", app, id)
		}
	}
}
