package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/monoclock"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
)

// The random run's shape. Independent groups of three server processes,
// each group on a key prefix of its own and with its own checker, share
// one 3-member etcd and run their steps at the same time; that is how a
// default run fits randomCompound compound steps in a few minutes on two
// cores. Between two etcd rounds every group runs randomBlock steps of
// its own; in an etcd round every group sets up a takeover and the etcd
// fault hits all of them at once.
const (
	randomGroups   = 6
	randomBlock    = 8
	randomApps     = 5
	randomWorkers  = 2 // per group
	randomCompound = 200
	// randomPing is the nodes' ping timeout (-ping-timeout): a takeover
	// of a hung owner then overwrites its key well within a 1 s TTL.
	randomPing = 250 * time.Millisecond
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
//	   expire.
//
// After each step heals, every app must have one owner within the
// largest TTL in play + 1 s (+ slack for CI) and every worker must point
// at its app's owner; after every step and at the end, the checker must
// find no overlap and no token going backwards.
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
		t.Logf("seed %d: failed after %d steps (%d compound) in %v (by kind: %s)",
			r.seed, r.steps.Load(), r.compound.Load(), time.Since(r.start).Round(time.Second), r.byKind())
		return
	}
	for _, g := range groups {
		for _, p := range g.c.check.verdict() {
			t.Errorf("%s at the end: %s", g.name, p)
		}
	}
	t.Logf("seed %d: %d steps, %d of them compound, in %v (%d groups; by kind: %s)",
		r.seed, r.steps.Load(), r.compound.Load(), time.Since(r.start).Round(time.Second), randomGroups, r.byKind())
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
	t          *testing.T
	etcd       *coord.Embedded
	seed       uint64
	rng        *rand.Rand // the etcd rounds' choices; only coordinate uses it
	soak       time.Duration
	keepGoing  bool
	start      time.Time
	bar        *barrier
	cancel     context.CancelFunc
	stopping   atomic.Bool
	etcdWhat   atomic.Value // string: the last etcd round's fault
	etcdOutage atomic.Bool  // whether it cost etcd its quorum
	steps      atomic.Int64
	compound   atomic.Int64
	compactMu  sync.Mutex
	compacted  time.Time

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
		if err := r.bar.wait(ctx, func() { r.stopping.Store(r.done()) }); err != nil {
			return err
		}
		if r.stopping.Load() {
			return nil
		}
		if err := r.bar.wait(ctx, nil); err != nil { // takeovers set up
			return err
		}
		if err := pause(ctx, between(r.rng, 0, 200*time.Millisecond)); err != nil {
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
	if err := forEach(members, r.etcd.Stop); err != nil {
		return err
	}
	took := time.Since(stopped)
	err = pause(ctx, hold)
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

// group is three server processes with their apps, workers and checker.
type group struct {
	r       *randomRun
	name    string
	c       *cluster
	rng     *rand.Rand
	ids     []string
	apps    []int64
	workers []*worker.Discovery
	moved   *notifier // a worker changed server
	mixed   bool      // TTLs 1, 2 and 3 s rather than 1 s
	ttlMax  time.Duration
	step    int
	futures int
}

func (r *randomRun) newGroup(i int, cli *clientv3.Client) *group {
	t := r.t
	name := fmt.Sprintf("g%d", i+1)
	g := &group{r: r, name: name, c: newClusterOn(t, r.etcd, prefix+"/"+name, time.Second),
		rng: rand.New(rand.NewPCG(r.seed, uint64(i+1))), moved: newNotifier(), mixed: i%2 == 1}
	g.c.args = []string{"-ping-timeout", randomPing.String()}
	g.ttlMax = time.Second
	for j := range 3 {
		id := fmt.Sprintf("%sn%d", name, j+1)
		g.ids = append(g.ids, id)
		if g.mixed {
			g.c.ttls[id] = time.Duration(j+1) * time.Second
			g.ttlMax = 3 * time.Second
		}
		g.c.start(id)
	}
	g.apps = g.c.register(randomApps)
	for _, app := range g.apps {
		g.c.acquire(g.c.nodes[g.ids[g.rng.IntN(3)]], app)
	}
	if _, err := g.c.check.waitOwned(g.apps, "", 10*time.Second); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for j := range randomWorkers {
		cfg := worker.DefaultConfig()
		cfg.AppName, cfg.Client, cfg.Prefix = fmt.Sprintf("app-%d", j), cli, g.c.prefix
		cfg.Interval, cfg.RequestTimeout, cfg.PingTimeout = 500*time.Millisecond, time.Second, 500*time.Millisecond
		cfg.OnChange = func(_, _ worker.Server) { g.moved.notify() }
		for _, id := range g.ids {
			cfg.Servers = append(cfg.Servers, g.c.nodes[id].public)
		}
		d, err := worker.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.Close)
		g.workers = append(g.workers, d)
	}
	return g
}

// loop runs the group's steps until the run is over.
func (g *group) loop(ctx context.Context) error {
	r := g.r
	for {
		for i := 0; i < randomBlock && !r.done(); i++ {
			if err := g.localStep(ctx); err != nil {
				return err
			}
		}
		if err := r.bar.wait(ctx, func() { r.stopping.Store(r.done()) }); err != nil {
			return err
		}
		if r.stopping.Load() {
			return nil
		}
		if err := g.etcdStep(ctx); err != nil {
			return err
		}
	}
}

// outcome is what a step did, for the log and the liveness check.
type outcome struct {
	kind     string // a, b, c, e, or single-*
	compound bool
	what     string
	started  time.Time
	healed   time.Time     // when the last fault healed
	extra    time.Duration // more time the liveness bound allows (a lease left to expire)
}

func (g *group) localStep(ctx context.Context) error {
	g.step++
	started := time.Now()
	var o outcome
	var err error
	switch n := g.rng.IntN(100); {
	case n < 20:
		o, err = g.single(ctx)
	case n < 55:
		o, err = g.takeoverThenFault(ctx)
	case n < 80:
		o, err = g.takeoverLostResponse(ctx)
	default:
		o, err = g.futureOwner(ctx)
	}
	if err != nil {
		return fmt.Errorf("%s step %d (%s): %w", g.name, g.step, o.what, err)
	}
	o.started = started
	return g.settle(ctx, o)
}

// etcdStep is a group's part in an etcd round: mostly a takeover under
// way when etcd fails (c), sometimes nothing but the etcd fault.
func (g *group) etcdStep(ctx context.Context) error {
	g.step++
	o := outcome{kind: "etcd", what: "no takeover under way, then", started: time.Now()}
	var heal func() error
	if g.rng.IntN(100) < 85 {
		var err error
		var desc string
		heal, desc, err = g.takeover(ctx)
		if err != nil {
			return fmt.Errorf("%s step %d (etcd round): %w", g.name, g.step, err)
		}
		o.kind, o.compound, o.what = "c", true, desc+", then"
	}
	err := g.r.bar.wait(ctx, nil) // set up
	if err == nil {
		err = g.r.bar.wait(ctx, nil) // etcd failed and came back
	}
	if err != nil {
		if heal != nil {
			heal()
		}
		return err
	}
	o.what += " " + g.r.etcdWhat.Load().(string) + " stopped and restarted"
	if o.kind == "c" && !g.r.etcdOutage.Load() {
		o.kind = "c-member" // a member lost, not the quorum
	} else if o.kind == "etcd" {
		o.kind = "single-etcd"
	}
	if heal != nil {
		if err := heal(); err != nil {
			return fmt.Errorf("%s step %d (%s): heal: %w", g.name, g.step, o.what, err)
		}
	}
	o.healed = time.Now()
	return g.settle(ctx, o)
}

// settle checks liveness after a step healed — every app owned within
// the largest TTL + 1 s (+ slack), every worker following — compacts,
// and asks the checker for its verdict.
func (g *group) settle(ctx context.Context, o outcome) error {
	r := g.r
	r.count(o.kind, o.compound)
	bound := g.ttlMax + time.Second + slack + o.extra
	var took time.Duration
	err := g.waitOwned(ctx, bound-time.Since(o.healed))
	if err == nil {
		took = time.Since(o.healed)
		err = g.followed(ctx, bound)
	}
	for _, id := range g.ids {
		if g.c.nodes[id].crashed() {
			err = errors.Join(err, fmt.Errorf("node %s exited by itself", id))
		}
	}
	problems := g.newProblems()
	if err != nil || len(problems) > 0 {
		msg := fmt.Sprintf("%s step %d [%s%s]: %s", g.name, g.step, o.kind, g.mixedTag(), o.what)
		if err != nil {
			msg += fmt.Sprintf(": liveness: %v\n\t%s", err, g.diagnose(ctx))
		}
		for _, p := range problems {
			msg += "\n\tVIOLATION " + p
		}
		if !r.keepGoing || ctx.Err() != nil {
			return errors.New(msg)
		}
		r.t.Error(msg)
	} else {
		r.t.Logf("%s step %d [%s%s]: %s; all owned %v after healing (step %v)", g.name, g.step, o.kind, g.mixedTag(), o.what,
			took.Round(time.Millisecond), time.Since(o.started).Round(time.Millisecond))
	}
	r.compact(ctx)
	return nil
}

// hello is what a node's /server/hello says: whether its guard is
// confirmed, and the apps it acts for with their tokens.
type hello struct {
	confirmed bool
	owned     map[int64]int64
	err       error
}

// hellos asks every node of the group at once.
func (g *group) hellos(ctx context.Context) map[string]hello {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var mu sync.Mutex
	out := map[string]hello{}
	var wg sync.WaitGroup
	for id, p := range g.c.nodes {
		wg.Go(func() {
			h := hello{owned: map[int64]int64{}}
			var body struct {
				Data struct {
					Owned []struct {
						AppID int64 `json:"appId"`
						Token int64 `json:"token"`
					} `json:"owned"`
					Lease struct {
						Confirmed bool `json:"confirmed"`
					} `json:"lease"`
				} `json:"data"`
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.addr+"/server/hello", nil)
			resp, err := g.c.http.Do(req)
			if err == nil {
				err = json.NewDecoder(resp.Body).Decode(&body)
				resp.Body.Close()
			}
			h.err, h.confirmed = err, body.Data.Lease.Confirmed
			for _, o := range body.Data.Owned {
				h.owned[o.AppID] = o.Token
			}
			mu.Lock()
			out[id] = h
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// waitOwned waits until every app has exactly one acting owner: one open
// interval in the checker, of a node whose guard is confirmed and which
// says it acts for the app with that interval's token. (The checker alone
// lags behind a node that has just been resumed: its end stamps are
// still on their way.) It wakes on every checker event, and every 50 ms
// to ask the nodes again.
func (g *group) waitOwned(ctx context.Context, timeout time.Duration) error {
	deadline := time.NewTimer(max(timeout, 0))
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		changed := g.c.check.changes()
		why := g.notOwned(ctx)
		if why == "" {
			return nil
		}
		select {
		case <-changed:
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("not every app owned %v after healing: %s", timeout.Round(time.Millisecond), why)
		}
	}
}

// notOwned says why not every app has one acting owner, or "" if each
// has.
func (g *group) notOwned(ctx context.Context) string {
	owners := g.c.check.openIntervals()
	var why []string
	for _, app := range g.apps {
		if len(owners[app]) != 1 {
			why = append(why, fmt.Sprintf("app %d acted for by %v", app, owners[app]))
		}
	}
	if len(why) > 0 {
		return strings.Join(why, ", ")
	}
	hs := g.hellos(ctx)
	for _, app := range g.apps {
		iv := owners[app][0]
		h, ok := hs[iv.server]
		switch {
		case !ok:
			why = append(why, fmt.Sprintf("app %d: %s is no node", app, iv.server))
		case h.err != nil:
			why = append(why, fmt.Sprintf("app %d: %s: %v", app, iv.server, h.err))
		case !h.confirmed || h.owned[app] != iv.token:
			why = append(why, fmt.Sprintf("app %d: %s (token %d) says confirmed %v, token %d", app, iv.server, iv.token, h.confirmed, h.owned[app]))
		}
	}
	return strings.Join(why, ", ")
}

// diagnose describes the owner keys of the apps without one acting
// owner, and what each node says it owns.
func (g *group) diagnose(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cli := g.r.etcd.Client()
	owners := g.c.check.owners()
	var out []string
	for _, app := range g.apps {
		if len(owners[app]) == 1 {
			continue
		}
		desc := fmt.Sprintf("app %d acted for by %v, key: ", app, owners[app])
		resp, err := cli.Get(ctx, g.c.keys.Owner(app))
		switch {
		case err != nil:
			desc += err.Error()
		case len(resp.Kvs) == 0:
			desc += "none"
		default:
			kv := resp.Kvs[0]
			var rec struct {
				Version  int    `json:"version"`
				ServerID string `json:"serverId"`
			}
			json.Unmarshal(kv.Value, &rec)
			desc += fmt.Sprintf("%s (v%d) token %d lease %x", rec.ServerID, rec.Version, kv.ModRevision, kv.Lease)
			if ttl, err := cli.TimeToLive(ctx, clientv3.LeaseID(kv.Lease)); err == nil {
				desc += fmt.Sprintf(" ttl %ds", ttl.TTL)
			}
		}
		out = append(out, desc)
	}
	hs := g.hellos(ctx)
	for _, id := range g.ids {
		h := hs[id]
		if h.err != nil {
			out = append(out, fmt.Sprintf("%s: %v", id, h.err))
		} else {
			out = append(out, fmt.Sprintf("%s: confirmed %v, acts for %v", id, h.confirmed, h.owned))
		}
	}
	return strings.Join(out, "\n\t")
}

func (g *group) mixedTag() string {
	if g.mixed {
		return "+d"
	}
	return ""
}

// newProblems returns the checker's violations not reported before.
func (g *group) newProblems() []string {
	var out []string
	g.r.mu.Lock()
	defer g.r.mu.Unlock()
	for _, p := range g.c.check.verdict() {
		p = g.name + ": " + p
		if !g.r.seen[p] {
			g.r.seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// compact compacts the whole keyspace while servers and workers watch
// (at most once a second, however many groups ask): their watches are
// synced, so nothing may break; one that was behind must recover by
// reading again.
func (r *randomRun) compact(ctx context.Context) {
	r.compactMu.Lock()
	defer r.compactMu.Unlock()
	if time.Since(r.compacted) < time.Second {
		return
	}
	r.compacted = time.Now()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if cur, err := r.etcd.Client().Get(cctx, "compact-marker"); err == nil {
		if _, err := r.etcd.Client().Compact(cctx, cur.Header.Revision); err != nil {
			r.t.Logf("compact at %d: %v", cur.Header.Revision, err)
		}
	}
}

// followed waits until every worker points at its app's owner.
func (g *group) followed(ctx context.Context, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		checked, moved := g.c.check.changes(), g.moved.wait()
		owners := g.c.check.owners()
		ok := true
		for _, w := range g.workers {
			cur, known := w.Current()
			server := owners[w.AppID()]
			if !known || len(server) != 1 || g.c.nodes[server[0]] == nil || g.c.nodes[server[0]].public != cur.Address {
				ok = false
			}
		}
		if ok {
			return nil
		}
		select {
		case <-checked:
		case <-moved:
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("workers did not follow their owners within %v", timeout)
		}
	}
}

// ---- the steps ----

// single is one of the single faults on one server: SIGKILL and restart,
// SIGSTOP and SIGCONT, or a partition from etcd.
func (g *group) single(ctx context.Context) (outcome, error) {
	p := g.c.nodes[g.ids[g.rng.IntN(3)]]
	ttl := g.c.ttlOf(p.id)
	hold := between(g.rng, ttl/2, ttl*3/2)
	o := outcome{}
	heal := func() error { return nil }
	switch g.rng.IntN(3) {
	case 0:
		o.kind, o.what = "single-kill", "SIGKILL and restart "+p.id
		g.c.kill(p)
		heal = func() error { return g.restart(p.id) }
	case 1:
		o.kind, o.what = "single-stop", "SIGSTOP/SIGCONT "+p.id
		p.signal(syscall.SIGSTOP)
		heal = func() error { p.signal(syscall.SIGCONT); return nil }
	case 2:
		o.kind, o.what = "single-partition", "partition "+p.id+" from etcd"
		p.partition(true)
		heal = func() error { p.partition(false); return nil }
	}
	o.what += fmt.Sprintf(" (TTL %v), held %v", ttl, hold.Round(time.Millisecond))
	err := pause(ctx, hold)
	if herr := heal(); herr != nil {
		return o, herr
	}
	o.healed = time.Now()
	return o, err
}

// restart starts a killed node again. With BATON_KEEP_GOING a node that
// fails to start is reported and started again, as a supervisor would.
func (g *group) restart(id string) error {
	for attempt := 1; ; attempt++ {
		_, err := g.c.startNode(id)
		if err == nil || !g.r.keepGoing || attempt == 3 {
			return err
		}
		g.r.t.Errorf("%s step %d: restart %s: %v", g.name, g.step, id, err)
	}
}

// hang makes an owner unable to answer its peers while its key lives
// on: SIGSTOP, or a partition from etcd and from the other servers.
func (g *group) hang(p *proc) (string, func()) {
	if g.rng.IntN(2) == 0 {
		p.signal(syscall.SIGSTOP)
		return "SIGSTOP " + p.id, func() { p.signal(syscall.SIGCONT) }
	}
	p.partition(true)
	p.partitionFromPeers(true)
	return "cut " + p.id + " off from etcd and peers", func() {
		p.partition(false)
		p.partitionFromPeers(false)
	}
}

// fault hits a running server that is not hung: SIGKILL (healed by a
// restart), SIGSTOP or a partition from etcd.
func (g *group) fault(p *proc) (string, func() error) {
	switch g.rng.IntN(3) {
	case 0:
		g.c.kill(p)
		return "SIGKILL " + p.id, func() error { return g.restart(p.id) }
	case 1:
		p.signal(syscall.SIGSTOP)
		return "SIGSTOP " + p.id, func() error { p.signal(syscall.SIGCONT); return nil }
	default:
		p.partition(true)
		return "cut " + p.id + " off from etcd", func() error { p.partition(false); return nil }
	}
}

// pickTakeover picks an owner with at least one app and another server
// to take them.
func (g *group) pickTakeover() (owner, taker *proc, apps []int64) {
	byServer := map[string][]int64{}
	for app, servers := range g.c.check.owners() {
		if len(servers) == 1 && slices.Contains(g.apps, app) {
			byServer[servers[0]] = append(byServer[servers[0]], app)
		}
	}
	var owners []string
	for _, id := range g.ids {
		if len(byServer[id]) > 0 {
			owners = append(owners, id)
		}
	}
	if len(owners) == 0 { // only after a liveness failure (BATON_KEEP_GOING)
		owners = g.ids
	}
	a := owners[g.rng.IntN(len(owners))]
	// The taker must be able to take: prefer a confirmed one (one that
	// has just been healed may not be yet).
	hs := g.hellos(context.Background())
	var others, ready []string
	for _, id := range g.ids {
		if id != a {
			others = append(others, id)
			if hs[id].confirmed {
				ready = append(ready, id)
			}
		}
	}
	if len(ready) > 0 {
		others = ready
	}
	b := others[g.rng.IntN(len(others))]
	apps = byServer[a]
	slices.Sort(apps)
	return g.c.nodes[a], g.c.nodes[b], apps
}

// acquireAll asks taker for every app at once, as workers would, and
// says how it answered: "took n" counts the apps for which it gave its
// own address, followed by the first other answer.
func (g *group) acquireAll(taker *proc, apps []int64) string {
	return acquireAll(g.c, taker, apps, g.names())
}

// acquireAll is group.acquireAll for goroutines other than the group's
// (which may restart nodes meanwhile): names is g.names() taken before.
func acquireAll(c *cluster, taker *proc, apps []int64, names map[string]string) string {
	var mu sync.Mutex
	took, other := 0, ""
	var wg sync.WaitGroup
	for _, app := range apps {
		wg.Go(func() {
			addr, err := c.acquire(taker, app)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil && addr == taker.public:
				took++
			case other != "":
			case err != nil:
				other = fmt.Sprintf("; app %d: %v", app, err)
			default:
				name, ok := names[addr]
				if !ok {
					name = addr
				}
				other = fmt.Sprintf("; app %d: sent to %s", app, name)
			}
		})
	}
	wg.Wait()
	return fmt.Sprintf("took %d%s", took, other)
}

// names maps the nodes' worker addresses to their ids.
func (g *group) names() map[string]string {
	out := map[string]string{}
	for id, p := range g.c.nodes {
		out[p.public] = id
	}
	return out
}

// takeover hangs an owner and has another server overwrite its live
// keys; heal lets the owner run again.
func (g *group) takeover(ctx context.Context) (heal func() error, what string, err error) {
	a, b, apps := g.pickTakeover()
	hung, healA := g.hang(a)
	took := g.acquireAll(b, apps)
	what = fmt.Sprintf("%s (TTL %v, %d apps), %s (TTL %v) %s", hung, g.c.ttlOf(a.id), len(apps), b.id, g.c.ttlOf(b.id), took)
	return func() error { healA(); return nil }, what, ctx.Err()
}

// takeoverThenFault (a): a takeover of a hung owner, then, within the
// owner's TTL, a crash, pause or partition of the taker; then everything
// heals.
func (g *group) takeoverThenFault(ctx context.Context) (outcome, error) {
	o := outcome{kind: "a", compound: true}
	a, b, apps := g.pickTakeover()
	hung, healA := g.hang(a)
	hungAt := time.Now()
	took := g.acquireAll(b, apps)
	ttlA := g.c.ttlOf(a.id)
	// Within A's TTL of its hanging: while B waits A out.
	offset := between(g.rng, 0, ttlA-time.Since(hungAt))
	hold := between(g.rng, 200*time.Millisecond, g.c.ttlOf(b.id))
	o.what = fmt.Sprintf("%s (TTL %v, %d apps), %s (TTL %v) %s", hung, ttlA, len(apps), b.id, g.c.ttlOf(b.id), took)
	if err := pause(ctx, offset); err != nil {
		healA()
		return o, err
	}
	faulted, healB := g.fault(b)
	o.what += fmt.Sprintf(", +%v %s, held %v", offset.Round(time.Millisecond), faulted, hold.Round(time.Millisecond))
	err := pause(ctx, hold)
	var herr error
	if g.rng.IntN(2) == 0 {
		herr = healB()
		healA()
	} else {
		healA()
		herr = healB()
	}
	o.healed = time.Now()
	return o, errors.Join(err, herr)
}

// takeoverLostResponse (b): a takeover of a hung owner during which the
// taker's receive path from etcd stops right after its election request
// went out: etcd applies the request, the taker does not hear of it
// until the path heals.
func (g *group) takeoverLostResponse(ctx context.Context) (outcome, error) {
	o := outcome{kind: "b", compound: true}
	a, b, apps := g.pickTakeover()
	if len(apps) > 0 {
		apps = apps[:1+g.rng.IntN(len(apps))]
	}
	hung, healA := g.hang(a)
	// The election writes right after its ping of the hung owner times
	// out; sometimes cut earlier (the lock's answer is lost) or later.
	offset := randomPing + between(g.rng, -20*time.Millisecond, 60*time.Millisecond)
	if g.rng.IntN(4) == 0 {
		offset = between(g.rng, 0, randomPing+200*time.Millisecond)
	}
	hold := between(g.rng, 300*time.Millisecond, g.c.ttlOf(a.id)+500*time.Millisecond)
	var asked sync.WaitGroup
	names := g.names()
	asked.Go(func() { acquireAll(g.c, b, apps, names) })
	err := pause(ctx, offset)
	b.pauseRx(true)
	o.what = fmt.Sprintf("%s (TTL %v), %s asked for %d apps, its etcd answers held from +%v for %v (TTL %v)",
		hung, g.c.ttlOf(a.id), b.id, len(apps), offset.Round(time.Millisecond), hold.Round(time.Millisecond), g.c.ttlOf(b.id))
	if err == nil {
		err = pause(ctx, hold)
	}
	if g.rng.IntN(2) == 0 {
		b.pauseRx(false)
		healA()
	} else {
		healA()
		b.pauseRx(false)
	}
	o.healed = time.Now()
	asked.Wait()
	return o, err
}

// futureOwner (e): a new app owned by a newer baton (record version 2,
// unknown fields) that answers no ping, under a lease the test keeps
// alive. Servers are asked for it — one of them sometimes crashed,
// paused or cut off meanwhile — and must not act before the lease is
// gone; then the test revokes the lease or lets it expire, and the app
// must get an owner within the servers' TTL + 1 s (+ slack).
func (g *group) futureOwner(ctx context.Context) (outcome, error) {
	o := outcome{kind: "e", compound: true}
	g.futures++
	name := fmt.Sprintf("future-%d", g.futures)
	reg := coord.NewRegistry(g.r.etcd.Client(), g.c.keys)
	app, err := reg.Register(ctx, name)
	if err != nil {
		return o, err
	}
	leaseTTL := time.Duration(2+g.rng.IntN(2)) * time.Second
	f, err := startForeign(ctx, g, app.ID, leaseTTL)
	if err != nil {
		return o, err
	}
	first := g.c.nodes[g.ids[g.rng.IntN(3)]]
	o.what = fmt.Sprintf("app %d owned by a v2 server (lease TTL %v), %s asked", app.ID, leaseTTL, first.id)
	var asked sync.WaitGroup
	names := g.names()
	asked.Go(func() { acquireAll(g.c, first, []int64{app.ID}, names) })
	keep := between(g.rng, leaseTTL/2, leaseTTL+time.Second)
	kept := time.Now()
	if g.rng.IntN(2) == 0 {
		offset := between(g.rng, 0, randomPing+300*time.Millisecond)
		hold := between(g.rng, 200*time.Millisecond, g.c.ttlOf(first.id))
		err = pause(ctx, offset)
		faulted, heal := g.fault(first)
		if err == nil {
			err = pause(ctx, hold)
		}
		err = errors.Join(err, heal())
		o.what += fmt.Sprintf(", +%v %s for %v", offset.Round(time.Millisecond), faulted, hold.Round(time.Millisecond))
	}
	second := g.c.nodes[g.ids[g.rng.IntN(3)]]
	asked.Go(func() { acquireAll(g.c, second, []int64{app.ID}, names) })
	o.what += ", " + second.id + " asked"
	if err == nil {
		err = pause(ctx, keep-time.Since(kept))
	}
	revoke := g.rng.IntN(2) == 0
	end, gone := f.end(revoke)
	// Until the lease can have expired (its last keepalive's TTL after
	// that keepalive was sent), the v2 server may still act: that is
	// part of this step, and its verdict must see who acted meanwhile.
	if err == nil {
		err = pause(ctx, time.Duration(end-monoclock.Now()))
	}
	if revoke {
		o.what += fmt.Sprintf(", lease revoked after %v", time.Since(kept).Round(time.Millisecond))
	} else {
		o.what += fmt.Sprintf(", lease left to expire after %v", time.Since(kept).Round(time.Millisecond))
	}
	asked.Wait()
	g.apps = append(g.apps, app.ID)
	// The liveness bound runs from when the lease is gone at the latest.
	o.healed = time.Now()
	o.extra = time.Until(gone)
	return o, err
}

// foreign is the lease and owner record of a server of a newer baton,
// kept alive by the test; the checker sees its ownership as an interval
// of server "<group>-v2".
type foreign struct {
	g        *group
	app      int64
	token    int64
	lease    clientv3.LeaseID
	stop     chan struct{}
	stopped  chan struct{}
	mu       sync.Mutex
	ackedAt  int64 // CLOCK_MONOTONIC before sending the last acknowledged keepalive
	ackedTTL time.Duration
}

func startForeign(ctx context.Context, g *group, app int64, ttl time.Duration) (*foreign, error) {
	cli := g.r.etcd.Client()
	f := &foreign{g: g, app: app, stop: make(chan struct{}), stopped: make(chan struct{})}
	sent := monoclock.Now()
	grant, err := cli.Grant(ctx, int64(ttl/time.Second))
	if err != nil {
		return nil, err
	}
	f.lease, f.ackedAt, f.ackedTTL = grant.ID, sent, time.Duration(grant.TTL)*time.Second
	rec := map[string]any{
		"version":  2,
		"serverId": g.name + "-v2",
		"protocols": map[string]any{
			"HTTP": map[string]any{"address": freeAddr(g.r.t)}, // nothing answers there
			"GRPC": map[string]any{"address": freeAddr(g.r.t)},
		},
		"ttlMillis":  ttl.Milliseconds(),
		"acquiredAt": time.Now().UTC(),
		"epoch":      map[string]any{"term": 7, "lease": fmt.Sprintf("%x", int64(grant.ID))},
		"weight":     3,
	}
	val, _ := json.Marshal(rec)
	key := g.c.keys.Owner(app)
	txn, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(val), clientv3.WithLease(grant.ID))).Commit()
	if err != nil || !txn.Succeeded {
		cli.Revoke(context.Background(), grant.ID)
		return nil, fmt.Errorf("write a v2 owner record for new app %d: succeeded %v, %v", app, txn != nil && txn.Succeeded, err)
	}
	f.token = txn.Header.Revision
	g.c.check.add(nodeEvent{Event: "acquire", Server: g.name + "-v2", App: app, Token: f.token, MonoNs: monoclock.Now()})
	go f.keepAlive(ttl)
	return f, nil
}

func (f *foreign) keepAlive(ttl time.Duration) {
	defer close(f.stopped)
	tick := time.NewTicker(ttl / 3)
	defer tick.Stop()
	for {
		select {
		case <-f.stop:
			return
		case <-tick.C:
		}
		sent := monoclock.Now()
		ctx, cancel := context.WithTimeout(context.Background(), ttl/3)
		resp, err := f.g.r.etcd.Client().KeepAliveOnce(ctx, f.lease)
		cancel()
		if err == nil && resp.TTL > 0 {
			f.mu.Lock()
			f.ackedAt, f.ackedTTL = sent, time.Duration(resp.TTL)*time.Second
			f.mu.Unlock()
		}
	}
}

// end stops the keepalives and revokes the lease (or lets it expire),
// closes the foreign interval at the earliest instant the lease can have
// been gone (CLOCK_MONOTONIC), and returns that and the latest instant
// it will be gone.
func (f *foreign) end(revoke bool) (int64, time.Time) {
	close(f.stop)
	<-f.stopped
	f.mu.Lock()
	// The last acknowledged keepalive was processed after it was sent:
	// the lease lives at least its TTL from then.
	end := f.ackedAt + int64(f.ackedTTL)
	f.mu.Unlock()
	gone := time.Now().Add(f.ackedTTL)
	if revoke {
		at := monoclock.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := f.g.r.etcd.Client().Revoke(ctx, f.lease)
		cancel()
		if err == nil {
			end, gone = min(end, at), time.Now()
		}
	}
	f.g.c.check.add(nodeEvent{Event: "end", Server: f.g.name + "-v2", App: f.app, Token: f.token, MonoNs: end})
	return end, gone
}

// ---- plumbing ----

// pause waits d — a fault's duration or its offset, never a condition.
func pause(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// between is a random duration in [lo, hi).
func between(rng *rand.Rand, lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + time.Duration(rng.Int64N(int64(hi-lo)))
}

// barrier lets n goroutines meet; the last to arrive runs action (if
// any) before releasing the others.
type barrier struct {
	n       int
	mu      sync.Mutex
	arrived int
	release chan struct{}
}

func newBarrier(n int) *barrier { return &barrier{n: n, release: make(chan struct{})} }

func (b *barrier) wait(ctx context.Context, action func()) error {
	b.mu.Lock()
	ch := b.release
	b.arrived++
	if b.arrived == b.n {
		if action != nil {
			action()
		}
		b.arrived = 0
		b.release = make(chan struct{})
		close(ch)
		b.mu.Unlock()
		return nil
	}
	b.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// notifier wakes every waiter whenever notify is called.
type notifier struct {
	mu sync.Mutex
	ch chan struct{}
}

func newNotifier() *notifier { return &notifier{ch: make(chan struct{})} }

func (n *notifier) notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	close(n.ch)
	n.ch = make(chan struct{})
}

func (n *notifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}
