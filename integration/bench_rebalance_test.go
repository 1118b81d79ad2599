package integration

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

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// Rebalancing benchmarks: one etcd, 10,000 registered apps, TTL 2 s, the
// default rebalance rate (2% of a server's apps per second) and a settle
// delay of rebalanceBenchSettle (2 s, not the default 10 s, so that the
// rolling deploy's three settles fit; the figure "s-to-balanced" is
// compared with that settle delay, see its target). Each scenario starts
// its own servers on the shared etcd and wipes them at its end, so only
// the registry is shared. Moves are counted exactly from one watch of
// every owner key (an owner key written naming another server than the
// app's previous owner); "balanced" is exactly every app owned by its
// preferred server, the first by coord.RankWeighted over the live
// servers' placement weights read from etcd.
const (
	rebalanceBenchApps   = 10000
	rebalanceBenchSettle = 2 * time.Second
	rebalanceBenchRate   = 0.02 // election.DefaultTuning's
)

// BenchmarkRebalance runs the balance scenarios of issue #16 on 10,000
// apps: first-come (Balance off, every app asked at the first server
// listed: PowerJob's placement, the baseline) through a join, then a
// rolling deploy; join (a 4th server joins 3 balanced ones: apps moved
// per the minimum 10,000/4, and the time from the join until every app is
// on its preferred server, against settle + 2,500 apps ÷ (2%/s × 10,000)
// as target-s); crash (one of 4 crashes: moves per orphan, apps moved by
// rebalancing in the settle delay and a second after, max/mean);
// rolling-deploy (A,B,C → E,F,G, each new server joining and, once
// everything is balanced, one old server closing, drained); weights
// (servers weighted 1, 1, 2, every app asked at the first: the
// weight-2 server's share); fan-out (100 watching workers of one app, 30
// rebalance moves and 30 plain handovers of it, against the plain put's
// fan-out to the same workers' clients). Run with -benchtime=1x.
func BenchmarkRebalance(b *testing.B) {
	e := testutil.Etcd(b, 1)
	ids := registerMany(b, newBenchClusterOn(b, e, 0), rebalanceBenchApps)
	b.Run("first-come", func(b *testing.B) { benchFirstCome(b, e, ids) })
	b.Run("join", func(b *testing.B) { benchJoin(b, e, ids) })
	b.Run("crash", func(b *testing.B) { benchCrash(b, e, ids) })
	b.Run("rolling-deploy", func(b *testing.B) { benchRollingDeploy(b, e, ids) })
	b.Run("weights", func(b *testing.B) { benchWeights(b, e, ids) })
	b.Run("fan-out", func(b *testing.B) { benchRebalanceFanOut(b, e, ids) })
}

// rebalancing is a node config edit: Balance on at the benchmark's
// settle delay and rate, callbacks into p.
func rebalancing(p *probe, settle time.Duration) func(*server.Config) {
	return func(c *server.Config) {
		c.Balance = true
		c.Election.RebalanceSettle, c.Election.RebalanceRate = settle, rebalanceBenchRate
		c.Callbacks = p.callbacks(c.ServerID)
	}
}

// benchFirstCome is the baseline: Balance off, every app asked at s1
// (first-come puts them all there), then s4 joins (nothing moves), then
// the rest of a rolling deploy (s1, s2, s3 closed one after the other,
// s5 and s6 joining): their apps go to their successors by rendezvous
// hashing, and nothing else moves.
func benchFirstCome(b *testing.B, e *etcdcluster.Cluster, ids []int64) {
	for range b.N {
		p := newProbe()
		bc := newBenchClusterWith(b, e, 3, func(c *server.Config) {
			c.Balance = false
			c.Callbacks = p.callbacks(c.ServerID)
		})
		log := watchOwners(b, bc)
		electAll(b, bc.nodes[:1], ids) // the PowerJob habit: one list, one order
		b.ReportMetric(log.maxMean(bc.ids(), len(ids)), "cold-max/mean")

		mark := log.mark()
		bc.addNode("127.0.0.1:0")
		bc.awaitMembers()
		b.ReportMetric(float64(len(log.movesSince(mark)))/(float64(len(ids))/4), "join-moves/min")
		b.ReportMetric(log.maxMean(bc.ids(), len(ids)), "join-max/mean")

		for i, old := range slices.Clone(bc.nodes[:3]) {
			if i > 0 {
				bc.addNode("127.0.0.1:0")
			}
			its := log.appsOf(old.ID())
			closeNode(b, bc, old)
			log.setTarget(successors(its, bc.placement())) // nothing else moves
			if _, err := log.waitBalanced(30 * time.Second); err != nil {
				b.Fatalf("after closing %s: %v", old.ID(), err)
			}
		}
		b.ReportMetric(log.maxMean(bc.ids(), len(ids)), "deploy-max/mean")
		b.ReportMetric(float64(len(log.movesSince(mark)))/float64(len(ids)), "deploy-moves/apps")
		b.Logf("first-come: after the deploy %v", log.counts())
		bc.wipe()
	}
}

// benchJoin: a 4th server joins three that own every app, each on its
// preferred server.
func benchJoin(b *testing.B, e *etcdcluster.Cluster, ids []int64) {
	for range b.N {
		p := newProbe()
		bc := newBenchClusterWith(b, e, 3, rebalancing(p, rebalanceBenchSettle))
		log := watchOwners(b, bc)
		placeAll(b, bc, log, ids)

		mark, lost := log.mark(), p.rebalanced()
		joined := time.Now() // before s4's membership key exists
		bc.addNode("127.0.0.1:0")
		bc.awaitMembers()
		want := successors(ids, bc.placement())
		log.setTarget(want)
		at, err := log.waitBalanced(rebalanceBenchSettle + 120*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		moves := log.movesSince(mark)
		minimum := float64(len(ids)) / 4
		joiner := bc.nodes[3].ID()
		for _, m := range moves {
			if m.to != joiner {
				b.Fatalf("app %d moved from %s to %s: only the joiner %s gains apps", m.app, m.from, m.to, joiner)
			}
		}
		if got := p.rebalanced() - lost; got != len(moves) {
			b.Fatalf("%d moves in etcd, %d OnLose(rebalanced)", len(moves), got)
		}
		b.ReportMetric(float64(len(moves))/minimum, "moves/min")
		b.ReportMetric(float64(len(moves))/float64(countFor(want, joiner)), "moves/preferred")
		b.ReportMetric(at.Sub(joined).Seconds(), "s-to-balanced")
		b.ReportMetric((rebalanceBenchSettle + time.Duration(minimum/(rebalanceBenchRate*float64(len(ids)))*float64(time.Second))).Seconds(), "target-s")
		b.ReportMetric(log.maxMean(bc.ids(), len(ids)), "max/mean")
		b.Logf("join: %d moves (the joiner is preferred for %d), balanced %v after the join; %v", len(moves), countFor(want, joiner), at.Sub(joined), log.counts())
		bc.wipe()
	}
}

// benchCrash: one of four servers, each owning the apps it is preferred
// for, crashes; its apps go to their successors, which are their
// preferred servers among the three left, and nothing else moves. The
// window watched for other moves ends a second after the settle delay
// from the moment the last orphan was taken over.
func benchCrash(b *testing.B, e *etcdcluster.Cluster, ids []int64) {
	for range b.N {
		p := newProbe()
		bc := newBenchClusterWith(b, e, 4, rebalancing(p, rebalanceBenchSettle))
		log := watchOwners(b, bc)
		placeAll(b, bc, log, ids)

		victim := bc.nodes[1]
		orphans := log.counts()[victim.ID()]
		mark, lost := log.mark(), p.rebalanced()
		crashed := time.Now()
		servertest.Crash(victim)
		bc.remove(victim)
		bc.awaitMembers()
		log.setTarget(successors(ids, bc.placement()))
		at, err := log.waitBalanced(30 * time.Second)
		if err != nil {
			b.Fatal(err)
		}
		// An observation window: rebalancing may move nothing in it.
		<-time.After(time.Until(at.Add(rebalanceBenchSettle + time.Second)))
		moves := log.movesSince(mark)
		// Every move but an orphan's first is one beyond the orphans:
		// an orphan its successor had not taken within 2 s is taken by
		// whoever knows of it (election's orphanAnyone), and then
		// rebalanced to its preferred server.
		moved, extra := map[int64]int{}, 0
		var first *ownerMove
		for _, m := range moves {
			moved[m.app]++
			if m.from != victim.ID() || moved[m.app] > 1 {
				extra++
				if first == nil {
					first = &m
				}
			}
		}
		b.ReportMetric(float64(orphans), "orphans")
		b.ReportMetric(float64(len(moves))/float64(orphans), "moves/orphans")
		b.ReportMetric(float64(extra), "extra-moves")
		b.ReportMetric(float64(p.rebalanced()-lost), "rebalanced")
		b.ReportMetric(at.Sub(crashed).Seconds(), "s-to-owned")
		b.ReportMetric(log.maxMean(bc.ids(), len(ids)), "max/mean")
		b.Logf("crash of %s: %d orphans, %d moves, owned again after %v; %v", victim.ID(), orphans, len(moves), at.Sub(crashed), log.counts())
		if first != nil {
			b.Logf("first move beyond the orphans: app %d from %s to %s, %v after the crash", first.app, first.from, first.to, first.at.Sub(crashed))
		}
		bc.wipe()
	}
}

// benchRollingDeploy: A,B,C (s1–s3) → E,F,G (s4–s6), one at a time: the
// new server joins, and once every app is on its preferred server the
// old one closes (a drain: its apps go to their successors, its
// preferred servers among those left).
func benchRollingDeploy(b *testing.B, e *etcdcluster.Cluster, ids []int64) {
	for range b.N {
		p := newProbe()
		bc := newBenchClusterWith(b, e, 3, rebalancing(p, rebalanceBenchSettle))
		log := watchOwners(b, bc)
		placeAll(b, bc, log, ids)

		mark := log.mark()
		start := time.Now()
		for _, old := range slices.Clone(bc.nodes) {
			bc.addNode("127.0.0.1:0")
			bc.awaitMembers()
			log.setTarget(successors(ids, bc.placement()))
			if _, err := log.waitBalanced(rebalanceBenchSettle + 120*time.Second); err != nil {
				b.Fatal(err)
			}
			closeNode(b, bc, old)
			log.setTarget(successors(ids, bc.placement()))
			if _, err := log.waitBalanced(30 * time.Second); err != nil {
				b.Fatalf("after closing %s: %v", old.ID(), err)
			}
		}
		moves := log.movesSince(mark)
		b.ReportMetric(log.maxMean(bc.ids(), len(ids)), "max/mean")
		b.ReportMetric(float64(len(moves))/float64(len(ids)), "moves/apps")
		b.ReportMetric(time.Since(start).Seconds(), "s-deploy")
		b.Logf("rolling deploy: %d moves in %v; %v", len(moves), time.Since(start), log.counts())
		bc.wipe()
	}
}

// benchWeights: servers of weights 1, 1 and 2, every app asked at the
// first (Place): the weight-2 server's share.
func benchWeights(b *testing.B, e *etcdcluster.Cluster, ids []int64) {
	for range b.N {
		p := newProbe()
		bc := newBenchClusterWith(b, e, 3, func(c *server.Config) {
			rebalancing(p, rebalanceBenchSettle)(c)
			if c.ServerID == "s3" {
				c.Weight = 2
			}
		})
		log := watchOwners(b, bc)
		bc.awaitMembers()
		want := successors(ids, bc.placement())
		log.setTarget(want)
		askAll(b, bc.nodes[0].Elector().Place, ids)
		if _, err := log.waitBalanced(30 * time.Second); err != nil {
			b.Fatal(err)
		}
		share := float64(log.counts()["s3"]) / float64(len(ids))
		b.ReportMetric(share, "share")
		b.ReportMetric(float64(countFor(want, "s3"))/float64(len(ids)), "preferred-share")
		b.Logf("weights 1,1,2: %v", log.counts())
		bc.wipe()
	}
}

// benchRebalanceFanOut: three servers (settle 500 ms), one app, 100
// workers watching etcd, each with its own client. Each of 30 cycles
// hands the app from its preferred server to its successor (a plain
// HandOver, timed from the call) and lets rebalancing bring it back
// (timed from the moment the successor's ownership ended, just before
// the move's write); each sample ends when the last worker points at
// the new owner. The plain put's fan-out to the workers' clients is
// measured in the same run.
func benchRebalanceFanOut(b *testing.B, e *etcdcluster.Cluster, ids []int64) {
	const cycles, settle = 30, 500 * time.Millisecond
	for range b.N {
		p := newProbe()
		bc := newBenchClusterWith(b, e, 3, rebalancing(p, settle))
		log := watchOwners(b, bc)
		app := ids[0]
		placeAll(b, bc, log, []int64{app})
		f := startFleet(b, fleetConfig{N: 100, App: oneApp("app-0"), Etcd: e, Servers: bc.addrs()})
		home := bc.settledOwner(app, f)
		lost := p.rebalanced()
		var handovers, moves []time.Duration
		for i := range cycles {
			if !acting(home, app, 10*time.Second) {
				b.Fatalf("cycle %d: %s owns app %d in etcd but does not act for it", i, home.ID(), app)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			start := time.Now()
			_, err := home.Elector().HandOver(ctx, app)
			cancel()
			if err != nil {
				b.Fatalf("cycle %d: %v", i, err)
			}
			away := bc.newOwner(app, home)
			last, ok := f.followedAt(away.Addr(), 30*time.Second)
			if !ok {
				b.Fatal("workers did not follow the handover")
			}
			handovers = append(handovers, last.Sub(start))

			if back := bc.newOwner(app, away); back != home {
				b.Fatalf("app went to %s, not back to its preferred %s", back.ID(), home.ID())
			}
			last, ok = f.followedAt(home.Addr(), 30*time.Second)
			if !ok {
				b.Fatal("workers did not follow the rebalance")
			}
			ended, ok := p.endedAt(away.ID(), app, 10*time.Second)
			if !ok {
				b.Fatalf("%s's ownership of app %d never ended", away.ID(), app)
			}
			moves = append(moves, last.Sub(ended))
		}
		if got := p.rebalanced() - lost; got != cycles {
			b.Fatalf("%d OnLose(rebalanced) in %d cycles", got, cycles)
		}
		fan := fanOut(b, e.Client(), f.clients, cycles)
		reportLatencies(b, moves)
		b.ReportMetric(ms(percentile(handovers, 0.5)), "handover-p50-ms")
		b.ReportMetric(ms(percentile(handovers, 0.99)), "handover-p99-ms")
		b.ReportMetric(ms(percentile(fan, 0.5)), "fanout-p50-ms")
		b.ReportMetric(ms(percentile(fan, 0.99)), "fanout-p99-ms")
		b.ReportMetric(float64(percentile(moves, 0.99))/float64(percentile(fan, 0.99)), "p99/fanout-p99")
		b.ReportMetric(float64(percentile(moves, 0.99))/float64(percentile(handovers, 0.99)), "p99/handover-p99")
		bc.wipe()
	}
}

// acting waits until n acts for app.
func acting(n *server.Node, app int64, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		if _, ok := n.Elector().Ownership(app); ok {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
}

// closeNode closes n (a drain) and takes it out of bc.
func closeNode(b *testing.B, bc *benchCluster, n *server.Node) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		b.Fatalf("closing %s: %v", n.ID(), err)
	}
	bc.remove(n)
	bc.awaitMembers()
}

func (bc *benchCluster) ids() []string {
	var out []string
	for _, n := range bc.nodes {
		out = append(out, n.ID())
	}
	return out
}

// placement reads the live servers' placement weights from etcd.
func (bc *benchCluster) placement() []coord.Weighted {
	resp, err := bc.etcd.Client().Get(context.Background(), bc.keys.ServerPrefix(), clientv3.WithPrefix())
	if err != nil {
		bc.b.Fatal(err)
	}
	var recs []coord.ServerRecord
	for _, kv := range resp.Kvs {
		rec, err := coord.DecodeServerRecord(kv.Value)
		if err != nil {
			bc.b.Fatal(err)
		}
		recs = append(recs, rec)
	}
	return coord.Placement(recs, "")
}

// successors maps each app to its preferred server among placement.
func successors(ids []int64, placement []coord.Weighted) map[int64]string {
	out := make(map[int64]string, len(ids))
	for _, app := range ids {
		out[app] = coord.RankWeighted(app, placement)[0]
	}
	return out
}

func countFor(want map[int64]string, server string) int {
	n := 0
	for _, s := range want {
		if s == server {
			n++
		}
	}
	return n
}

// placeAll has every app elected by its preferred server — where Place
// would put it, without Place's ping of the preferred server — with 16
// callers per server, and waits until the owner keys show every app
// there.
func placeAll(b *testing.B, bc *benchCluster, log *ownerLog, ids []int64) {
	bc.awaitMembers()
	want := successors(ids, bc.placement())
	log.setTarget(want)
	byID := map[string]*server.Node{}
	for _, n := range bc.nodes {
		byID[n.ID()] = n
	}
	work := make(chan int64, len(ids))
	for _, app := range ids {
		work <- app
	}
	close(work)
	var failed atomic.Int64
	var wg sync.WaitGroup
	for range 16 * len(bc.nodes) {
		wg.Go(func() {
			for app := range work {
				if _, err := byID[want[app]].Elector().Elect(context.Background(), app, coord.ProtocolHTTP, ""); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() > 0 {
		b.Fatalf("%d elections failed", failed.Load())
	}
	if _, err := log.waitBalanced(30 * time.Second); err != nil {
		b.Fatal(err)
	}
}

// askAll answers every app with answer (an Elect or a Place of one
// server), 16 callers.
func askAll(b *testing.B, answer func(context.Context, int64, string, string) (string, error), ids []int64) {
	work := make(chan int64, len(ids))
	for _, app := range ids {
		work <- app
	}
	close(work)
	var failed atomic.Int64
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for app := range work {
				if _, err := answer(context.Background(), app, coord.ProtocolHTTP, ""); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() > 0 {
		b.Fatalf("%d answers failed", failed.Load())
	}
}

// probe counts the nodes' OnLose reasons and stamps when each ownership
// ended (its context was cancelled).
type probe struct {
	mu    sync.Mutex
	lost  map[election.Reason]int
	ended map[string]time.Time // server/app → the latest end
}

func newProbe() *probe {
	return &probe{lost: map[election.Reason]int{}, ended: map[string]time.Time{}}
}

func (p *probe) callbacks(server string) election.Callbacks {
	return election.Callbacks{
		OnAcquire: func(ctx context.Context, app, _ int64) {
			context.AfterFunc(ctx, func() {
				at := time.Now()
				p.mu.Lock()
				p.ended[fmt.Sprintf("%s/%d", server, app)] = at
				p.mu.Unlock()
			})
		},
		OnLose: func(_, _ int64, reason election.Reason) {
			p.mu.Lock()
			p.lost[reason]++
			p.mu.Unlock()
		},
	}
}

// rebalanced is the number of OnLose(ReasonRebalanced) so far.
func (p *probe) rebalanced() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lost[election.ReasonRebalanced]
}

// endedAt waits for the end stamp of server's ownership of app and
// takes it (the next ownership's end is stamped afresh).
func (p *probe) endedAt(server string, app int64, timeout time.Duration) (time.Time, bool) {
	k := fmt.Sprintf("%s/%d", server, app)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		at, ok := p.ended[k]
		delete(p.ended, k)
		p.mu.Unlock()
		if ok {
			return at, true
		}
		time.Sleep(time.Millisecond)
	}
	return time.Time{}, false
}

// ownerLog follows every owner key through one etcd watch: who owns each
// app, every move (an owner key written naming another server than the
// app's previous owner, across a deletion too: a crashed server's app
// taken over is one move), and whether every app of a target placement
// is there, with when that last became true.
type ownerLog struct {
	keys keyspace.Keys

	mu         sync.Mutex
	owner      map[int64]string // absent while the app has no key
	last       map[int64]string // the latest owner, kept across deletions
	moves      []ownerMove
	target     map[int64]string
	wrong      int       // apps of target not on their target server
	balancedAt time.Time // when wrong last became 0
	err        error
	changed    chan struct{}
}

type ownerMove struct {
	app      int64
	from, to string
	at       time.Time
}

// watchOwners reads every owner key of bc and follows them until the
// benchmark ends.
func watchOwners(b *testing.B, bc *benchCluster) *ownerLog {
	l := &ownerLog{keys: bc.keys, owner: map[int64]string{}, last: map[int64]string{}, changed: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	cli := testutil.Client(b, bc.etcd)
	resp, err := cli.Get(ctx, bc.keys.OwnerPrefix(), clientv3.WithPrefix())
	if err != nil {
		b.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		l.apply(&clientv3.Event{Type: clientv3.EventTypePut, Kv: kv}, time.Now())
	}
	wch := cli.Watch(ctx, bc.keys.OwnerPrefix(), clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for resp := range wch {
			if err := resp.Err(); err != nil {
				l.fail(err)
				return
			}
			now := time.Now()
			l.mu.Lock()
			for _, ev := range resp.Events {
				l.applyLocked(ev, now)
			}
			l.notifyLocked()
			l.mu.Unlock()
		}
		if ctx.Err() == nil {
			l.fail(errors.New("owner watch closed"))
		}
	}()
	b.Cleanup(func() { cancel(); <-done })
	return l
}

func (l *ownerLog) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err == nil {
		l.err = err
	}
	l.notifyLocked()
}

func (l *ownerLog) apply(ev *clientv3.Event, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.applyLocked(ev, at)
	l.notifyLocked()
}

func (l *ownerLog) applyLocked(ev *clientv3.Event, at time.Time) {
	app, err := l.keys.AppIDFromOwnerKey(string(ev.Kv.Key))
	if err != nil {
		l.err = fmt.Errorf("owner key %q: %w", ev.Kv.Key, err)
		return
	}
	was := l.owner[app]
	now := ""
	if ev.Type == clientv3.EventTypePut {
		rec, err := coord.DecodeOwnerRecord(ev.Kv.Value)
		if err != nil {
			l.err = fmt.Errorf("owner record of app %d: %w", app, err)
			return
		}
		now = rec.ServerID
		if prev := l.last[app]; prev != "" && prev != now {
			l.moves = append(l.moves, ownerMove{app: app, from: prev, to: now, at: at})
		}
		l.owner[app], l.last[app] = now, now
	} else {
		delete(l.owner, app)
	}
	if want, ok := l.target[app]; ok && (was == want) != (now == want) {
		if now == want {
			l.wrong--
			if l.wrong == 0 {
				l.balancedAt = at
			}
		} else {
			l.wrong++
		}
	}
}

func (l *ownerLog) notifyLocked() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// setTarget sets the placement waitBalanced waits for.
func (l *ownerLog) setTarget(want map[int64]string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.target, l.wrong = want, 0
	for app, s := range want {
		if l.owner[app] != s {
			l.wrong++
		}
	}
	if l.wrong == 0 {
		l.balancedAt = time.Now()
	}
}

// waitBalanced waits until every app of the target is owned by its
// target server and returns when the watch delivered the write that made
// it so.
func (l *ownerLog) waitBalanced(timeout time.Duration) (time.Time, error) {
	deadline := time.After(timeout)
	for {
		l.mu.Lock()
		ch, wrong, at, err := l.changed, l.wrong, l.balancedAt, l.err
		l.mu.Unlock()
		switch {
		case err != nil:
			return time.Time{}, err
		case wrong == 0:
			return at, nil
		}
		select {
		case <-ch:
		case <-deadline:
			return time.Time{}, fmt.Errorf("after %v, %d apps are not on their preferred server (owners: %v)", timeout, wrong, l.counts())
		}
	}
}

// mark is where movesSince starts counting.
func (l *ownerLog) mark() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.moves)
}

func (l *ownerLog) movesSince(mark int) []ownerMove {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.moves[mark:])
}

// counts returns how many apps each server owns.
func (l *ownerLog) counts() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for _, s := range l.owner {
		out[s]++
	}
	return out
}

// appsOf returns the apps server owns.
func (l *ownerLog) appsOf(server string) []int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []int64
	for app, s := range l.owner {
		if s == server {
			out = append(out, app)
		}
	}
	return out
}

// maxMean is the most apps any of servers owns over the mean, apps
// spread over all of them.
func (l *ownerLog) maxMean(servers []string, apps int) float64 {
	counts := l.counts()
	most := 0
	for _, s := range servers {
		most = max(most, counts[s])
	}
	return float64(most) / (float64(apps) / float64(len(servers)))
}
