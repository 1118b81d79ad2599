package integration

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/backoff"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/testutil"
)

// The random run's shape. Independent groups of three server processes,
// each group on a key prefix of its own and with its own checker, share
// one 3-member etcd and run their steps at the same time; that is how a
// default run fits randomCompound compound steps in a few minutes on two
// cores. Between two etcd rounds every group runs randomBlock steps of
// its own; in an etcd round every group sets up a takeover and the etcd
// fault hits all of them at once.
const (
	randomGroups  = 6
	randomBlock   = 8
	randomApps    = 5
	randomWorkers = 2 // per group
	// randomCompound is the default run's length: 120 compound steps take
	// about two minutes under -race, which .ci/run's 15-minute budget
	// affords beside the rest of the suite (200 took three). Longer
	// composition is BATON_SOAK's job.
	randomCompound = 120
	// randomPing is the nodes' ping timeout (-ping-timeout): a takeover
	// of a hung owner then overwrites its key well within a 1 s TTL.
	randomPing = 250 * time.Millisecond
	// randomAdminToken opens the nodes' /admin/ routes (-admin-token),
	// for the drain steps.
	randomAdminToken = "random-run-admin"
)

// TestRandomFaults runs groups of three server processes, their apps and
// a few workers through a seeded random sequence of faults. Single
// faults (kinds single-*): SIGKILL and restart, SIGSTOP and SIGCONT, a
// partition from etcd, etcd members stopped and restarted. Compound
// faults — a second fault during the recovery from the first:
//
//	a  an owner hangs (SIGSTOP, or cut off from etcd and from its peers),
//	   a worker-style /server/acquire makes another server overwrite its
//	   live key, and within the owner's TTL that taker is SIGKILLed (and
//	   restarted), SIGSTOPped or cut off from etcd;
//	b  the same takeover, with everything etcd sends the taker held from
//	   about when its election Txn goes out (sometimes earlier) for up to
//	   the owner's TTL + 0.5 s: etcd applies the request, the taker does
//	   not hear of it;
//	c  the same takeover, then an etcd outage (all members, or the
//	   leader and one more), hitting every group at once; c-member: the
//	   leader or a follower alone;
//	d  half of the groups run their servers with TTLs of 1, 2 and 3 s,
//	   the other half all with 1 s: every step in a mixed group mixes TTLs;
//	e  an app owned by a "newer baton": a version-2 owner record with
//	   unknown fields, bound to a lease the test keeps alive, at an
//	   address that answers nothing; servers are asked for the app (one
//	   of them sometimes crashed, paused or cut off meanwhile) and must not
//	   act before the lease is gone; the test then revokes it or lets it
//	   expire;
//	drain-cut, drain-fail-cut, drain-fail-stop (random_drain_test.go):
//	   a node is cut off from etcd during its /admin/drain for longer
//	   than its TTL and healed while the drain still runs, or cut off or
//	   paused until the drain's ctx has expired and the drain fails;
//	c-leader-crowd: c with the etcd leader stopped while a thousand more
//	   workers watch the groups' apps (random_crowd_test.go).
//
// Other kinds: drain-hangup (the drain's client hangs up at once),
// drain-lease-loss (a drained node cut off from etcd for longer than its
// TTL), unreachable (workers report a deposed owner unreachable while it
// still answers HTTP; random_unreachable_test.go), single-etcd-crowd.
// A drained node must own nothing and never come back into membership;
// it is then killed and started again.
//
// After each step heals, the second promise must hold, exactly
// (random_liveness_test.go): within the largest TTL in play + 1 s (+
// slack for CI), every app's owner key names a node that acts for it with
// the key's ModRevision as its token, its guard confirmed, and every
// worker's Current names that node, its ServerID and that token. After
// every step and at the end, the checker must find no overlap and no
// token going backwards. The last line gives the longest time from a
// step's healing to every app acting (and to every worker following),
// the longest from a drain or a drained node going silent to every app
// acting elsewhere, and the crowd rounds' HTTP requests.
//
// A default run stops after randomCompound compound steps; BATON_SOAK=10m
// runs the same mix for that long instead. BATON_SEED=n replays a run's
// choices (not its timing). BATON_KEEP_GOING=1 reports violations and
// goes on rather than stopping at the first.
func TestRandomFaults(t *testing.T) {
	r := &randomRun{t: t, start: time.Now(), kinds: map[string]int{}, seen: map[string]bool{}}
	if v := os.Getenv("BATON_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("BATON_SOAK=%q: %v", v, err)
		}
		r.soak = d
	}
	r.seed = uint64(time.Now().UnixNano())
	if v := os.Getenv("BATON_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("BATON_SEED=%q: %v", v, err)
		}
		r.seed = s
	}
	r.keepGoing = os.Getenv("BATON_KEEP_GOING") != ""
	t.Logf("seed %d (replay with BATON_SEED=%d)", r.seed, r.seed)
	r.rng = rand.New(rand.NewPCG(r.seed, 0))

	r.etcd = testutil.Etcd(t, 3)
	cli := testutil.Client(t, r.etcd) // the workers'
	r.crowdClients = r.crowdEtcdClients()
	var groups []*group
	for i := range randomGroups {
		groups = append(groups, r.newGroup(i, cli))
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r.cancel = cancel
	r.bar = newBarrier(randomGroups + 1)
	var wg sync.WaitGroup
	for _, g := range groups {
		wg.Go(func() {
			finished := false
			defer func() {
				if !finished { // a t.Fatal in a helper ended this goroutine
					r.fail(fmt.Errorf("%s: stopped by a fatal error", g.name))
				}
			}()
			if err := g.loop(ctx); err != nil && ctx.Err() == nil {
				r.fail(err)
			}
			finished = true
		})
	}
	if err := r.coordinate(ctx); err != nil && ctx.Err() == nil {
		r.fail(err)
	}
	wg.Wait()
	// Stop every node at once (each drains: its apps go to successors
	// that are draining too) and judge the whole history.
	var stops sync.WaitGroup
	for _, g := range groups {
		for _, p := range g.c.nodes {
			p.partition(false) // healed already, unless the run failed
			p.partitionFromPeers(false)
			p.pauseRx(false)
			stops.Go(p.stop)
		}
	}
	stops.Wait()
	if t.Failed() {
		t.Logf("seed %d: failed after %d steps (%d compound) in %v (by kind: %s); longest time-to-acting so far %v; "+
			"longest until every worker followed %v; longest from a drain or a drained node going silent %v; %s",
			r.seed, r.steps.Load(), r.compound.Load(), time.Since(r.start).Round(time.Second), r.byKind(),
			&r.acting, &r.following, &r.drainActing, r.crowdSummary())
		return
	}
	for _, g := range groups {
		for _, p := range g.c.check.verdict() {
			t.Errorf("%s at the end: %s", g.name, p)
		}
	}
	t.Logf("seed %d: %d steps, %d of them compound, in %v (%d groups; by kind: %s); longest time-to-acting %v; "+
		"longest until every worker followed %v; longest from a drain or a drained node going silent %v; %s",
		r.seed, r.steps.Load(), r.compound.Load(), time.Since(r.start).Round(time.Second), randomGroups, r.byKind(),
		&r.acting, &r.following, &r.drainActing, r.crowdSummary())
}

// byKind counts the steps of each kind.
func (r *randomRun) byKind() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var kinds []string
	for k, n := range r.kinds {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(kinds)
	return strings.Join(kinds, ", ")
}

// randomRun is what the groups share.
type randomRun struct {
	t           *testing.T
	etcd        *etcdcluster.Cluster
	seed        uint64
	rng         *rand.Rand // the etcd rounds' choices; only coordinate uses it
	soak        time.Duration
	keepGoing   bool
	start       time.Time
	bar         *barrier
	cancel      context.CancelFunc
	stopping    atomic.Bool
	etcdWhat    atomic.Value // string: the last etcd round's fault
	etcdOutage  atomic.Bool  // whether it cost etcd its quorum
	steps       atomic.Int64
	compound    atomic.Int64
	compactMu   sync.Mutex
	compacted   time.Time
	acting      longest // time from a step's healing until every app acted
	following   longest // … until every worker followed as well
	drainActing longest // time from a drain, or a drained node going silent, until every app acted elsewhere

	etcdRounds   atomic.Int64 // etcd rounds begun; changed only by the barrier's action
	crowdRound   atomic.Bool  // whether this etcd round is a crowd round
	crowdClients []*clientv3.Client
	crowdEtcd    etcdCount    // what the crowd asks etcd, from when all of it is up
	crowdStarted atomic.Int64 // groups whose crowd is up, this round
	crowdTally   crowdTally

	mu    sync.Mutex
	kinds map[string]int
	seen  map[string]bool // violations reported so far
}

// done says whether the run has done what it should: no group starts a
// step of its own after that, and the next etcd round ends the run.
func (r *randomRun) done() bool {
	if r.soak > 0 {
		return time.Since(r.start) >= r.soak
	}
	return r.compound.Load() >= randomCompound
}

func (r *randomRun) fail(err error) {
	r.t.Error(err)
	r.cancel()
}

func (r *randomRun) count(kind string, compound bool) {
	r.steps.Add(1)
	if compound {
		r.compound.Add(1)
	}
	r.mu.Lock()
	r.kinds[kind]++
	r.mu.Unlock()
}

// coordinate runs the etcd rounds: once every group has reached one, it
// decides whether the run is over; if not, it lets the groups set up
// their takeovers, then stops etcd members, restarts them, and lets the
// groups heal.
func (r *randomRun) coordinate(ctx context.Context) error {
	for {
		if err := r.bar.wait(ctx, r.nextRound); err != nil {
			return err
		}
		if r.stopping.Load() {
			return nil
		}
		if err := r.bar.wait(ctx, nil); err != nil { // takeovers set up
			return err
		}
		if err := backoff.Sleep(ctx, between(r.rng, 0, 200*time.Millisecond)); err != nil {
			return err
		}
		if err := r.etcdFault(ctx); err != nil {
			return err
		}
		if err := r.bar.wait(ctx, nil); err != nil { // etcd back
			return err
		}
	}
}

// nextRound runs when every group has reached an etcd round: it decides
// whether the run is over and whether this round is a crowd round.
func (r *randomRun) nextRound() {
	r.stopping.Store(r.done())
	r.crowdRound.Store(r.crowdNext())
	r.etcdRounds.Add(1)
	r.crowdStarted.Store(0)
}

// crowdNext says whether the next etcd round is a crowd round.
func (r *randomRun) crowdNext() bool { return r.etcdRounds.Load()%crowdEvery == 1 }

// etcdFault stops etcd members — all three, the leader and one more,
// the leader, or a follower — for a while, restarts them and waits until
// they have a leader again.
func (r *randomRun) etcdFault(ctx context.Context) error {
	leader, err := r.etcd.Leader(ctx)
	if err != nil {
		return err
	}
	var members []int
	var what string
	switch n := r.rng.IntN(100); {
	case r.crowdRound.Load():
		members, what = []int{leader}, fmt.Sprintf("the etcd leader (%d more workers watching)", crowdWorkers)
	case n < 40:
		members, what = []int{0, 1, 2}, "all etcd members"
	case n < 75:
		members, what = []int{leader, (leader + 1 + r.rng.IntN(2)) % 3}, "the etcd leader and a follower"
	case n < 90:
		members, what = []int{leader}, "the etcd leader"
	default:
		members, what = []int{(leader + 1 + r.rng.IntN(2)) % 3}, "an etcd follower"
	}
	r.etcdWhat.Store(what)
	r.etcdOutage.Store(len(members) > 1)
	hold := between(r.rng, 300*time.Millisecond, 1500*time.Millisecond)
	stopped := time.Now()
	if len(members) == 3 {
		r.etcd.StopAll() // a power cut: quorum goes at one instant
	} else if err := forEach(members, r.etcd.Stop); err != nil {
		return err
	}
	took := time.Since(stopped)
	err = backoff.Sleep(ctx, hold)
	// Restart even when the run is being cancelled: the nodes must be
	// able to drain.
	rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := forEach(members, func(i int) error { return r.etcd.Restart(rctx, i) }); err != nil {
		return err
	}
	if _, err := r.etcd.Leader(rctx); err != nil {
		return err
	}
	if err != nil {
		return err
	}
	r.t.Logf("etcd round: stopped %s (stopping took %v), held %v, back after %v", what, took.Round(time.Millisecond),
		hold.Round(time.Millisecond), time.Since(stopped).Round(time.Millisecond))
	return nil
}

// forEach runs f on every member at once.
func forEach(members []int, f func(int) error) error {
	errs := make(chan error, len(members))
	for _, i := range members {
		go func() { errs <- f(i) }()
	}
	var all []error
	for range members {
		all = append(all, <-errs)
	}
	return errors.Join(all...)
}
