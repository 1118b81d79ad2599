package integration

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/worker"
)

// group is three server processes with their apps, workers and checker.
type group struct {
	r       *randomRun
	index   int
	name    string
	c       *cluster
	cli     *clientv3.Client // the workers'
	rng     *rand.Rand
	ids     []string
	apps    []int64
	appName map[int64]string
	workers []follower
	moved   *notifier // a worker changed server
	mixed   bool      // TTLs 1, 2 and 3 s rather than 1 s
	ttlMax  time.Duration
	step    int
	futures int
}

func (r *randomRun) newGroup(i int, cli *clientv3.Client) *group {
	t := r.t
	name := fmt.Sprintf("g%d", i+1)
	g := &group{r: r, index: i, name: name, c: newClusterOn(t, r.etcd, prefix+"/"+name, time.Second), cli: cli,
		rng: rand.New(rand.NewPCG(r.seed, uint64(i+1))), appName: map[int64]string{}, moved: newNotifier(), mixed: i%2 == 1}
	g.c.args = []string{"-ping-timeout", randomPing.String(), "-admin-token", randomAdminToken}
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
	for j, app := range g.apps {
		g.appName[app] = fmt.Sprintf("app-%d", j)
		g.c.acquire(g.c.nodes[g.ids[g.rng.IntN(3)]], app)
	}
	if _, err := g.c.check.waitOwned(g.apps, "", 10*time.Second); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for j := range randomWorkers {
		d, err := g.newWorker(fmt.Sprintf("app-%d", j), func(worker.Server) {}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.Close)
		g.workers = append(g.workers, follower{name: fmt.Sprintf("%s/app-%d", name, j), d: d})
	}
	return g
}

// newWorker starts a worker of app that watches etcd through the
// group's client and knows every node; seen is told of each change of
// its server; tune, if set, changes its configuration.
func (g *group) newWorker(app string, seen func(worker.Server), tune func(*worker.Config)) (*worker.Discovery, error) {
	cfg := worker.DefaultConfig()
	cfg.AppName, cfg.Client, cfg.Prefix = app, g.cli, g.c.prefix
	cfg.Interval, cfg.RequestTimeout, cfg.PingTimeout = 500*time.Millisecond, time.Second, 500*time.Millisecond
	cfg.OnChange = func(_, s worker.Server) {
		seen(s)
		g.moved.notify()
	}
	for _, id := range g.ids {
		cfg.Servers = append(cfg.Servers, g.c.nodes[id].public)
	}
	if tune != nil {
		tune(&cfg)
	}
	d, err := worker.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := d.Start(context.Background()); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
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
		err := r.bar.wait(ctx, r.nextRound)
		if err == nil && !r.stopping.Load() {
			err = g.etcdStep(ctx)
		}
		if err != nil || r.stopping.Load() {
			return err
		}
	}
}

// outcome is what a step did, for the log and the liveness check.
type outcome struct {
	kind     string // a, b, c, e, single-*, drain-*, unreachable, …
	compound bool
	what     string
	started  time.Time
	healed   time.Time     // when the last fault healed
	extra    time.Duration // after healed, until the last fault is gone (a lease left to expire)
	workers  []follower    // the step's own workers, checked with the group's, closed after it
	release  func()        // if set, runs after the step's workers are closed
	crowd    *crowd        // an etcd round's thousand workers, checked with the group's
	// problems are violations the step found itself; liveness, liveness
	// failures it found during the step (each with its diagnosis).
	problems []string
	liveness []string
	// after, if set, runs once the step is live: the step's own checks
	// that need the final owners; it returns violations.
	after func(ctx context.Context) []string
	// pending, if set, waits for the step's requests still under way
	// after it healed (they must not delay the first look) and returns
	// what to add to what.
	pending func() string
}

func (g *group) localStep(ctx context.Context) error {
	g.step++
	started := time.Now()
	var o outcome
	var err error
	defer func() {
		if o.pending != nil {
			o.pending() // settle has waited already, unless the step failed
		}
		for _, w := range o.workers {
			w.d.Close()
		}
		if o.release != nil {
			o.release()
		}
	}()
	switch n := g.rng.IntN(100); {
	case n < 14:
		o, err = g.single(ctx)
	case n < 49:
		o, err = g.takeoverThenFault(ctx)
	case n < 69:
		o, err = g.takeoverLostResponse(ctx)
	case n < 87:
		o, err = g.futureOwner(ctx)
	case n < 91:
		o, err = g.unreachable(ctx)
	default:
		o, err = g.drainStep(ctx, n-91)
	}
	if err != nil {
		return fmt.Errorf("%s step %d (%s): %w", g.name, g.step, o.what, err)
	}
	o.started = started
	return g.settle(ctx, o)
}

// etcdStep is a group's part in an etcd round: mostly a takeover under
// way when etcd fails (c), sometimes nothing but the etcd fault. In a
// crowd round (the etcd leader alone fails) the group first starts its
// share of the thousand watching workers, and they must follow too.
func (g *group) etcdStep(ctx context.Context) error {
	g.step++
	o := outcome{kind: "etcd", what: "no takeover under way, then", started: time.Now()}
	if g.r.crowdRound.Load() {
		// Every group is between steps: a crowd starting while others
		// run theirs would starve their servers of etcd.
		cr, err := g.startCrowd(ctx)
		defer cr.close()
		if err != nil {
			return fmt.Errorf("%s step %d (etcd round): %w", g.name, g.step, err)
		}
		o.crowd = cr
		o.started = time.Now()
	}
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
	switch {
	case o.crowd != nil && o.kind == "c":
		o.kind = "c-leader-crowd"
	case o.crowd != nil:
		o.kind = "single-etcd-crowd"
	case o.kind == "c" && !g.r.etcdOutage.Load():
		o.kind = "c-member" // a member lost, not the quorum
	case o.kind == "etcd":
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

// settle checks the second promise after a step healed (see look): by
// the largest TTL + 1 s (+ slack) after the step's faults healed, every
// app acts on the node its key names and every worker — the group's,
// the step's own and a crowd's — names that node and token. Then it runs
// the step's own checks, compacts, and asks the checker for its verdict.
func (g *group) settle(ctx context.Context, o outcome) error {
	r := g.r
	r.count(o.kind, o.compound)
	from := o.healed.Add(o.extra) // when the last fault was gone
	bound := g.ttlMax + time.Second + slack
	workers := slices.Concat(g.workers, o.workers)
	if o.crowd != nil {
		workers = append(workers, o.crowd.ws...)
	}
	acting, waited, err := g.waitLive(ctx, from, from.Add(bound), workers, "")
	following := time.Since(from)
	where := fmt.Sprintf("%s step %d [%s%s]", g.name, g.step, o.kind, g.mixedTag())
	if err == nil {
		r.acting.note(acting, where)
		r.following.note(following, where)
		if following > g.ttlMax+time.Second {
			r.t.Logf("%s: every app acting %v and every worker following only %v after healing (TTL + 1 s is %v; slack allowed); last missing: %s",
				where, acting.Round(time.Millisecond), following.Round(time.Millisecond), g.ttlMax+time.Second, waited)
		}
	}
	if o.pending != nil {
		o.what += o.pending()
	}
	problems := o.problems
	if err == nil && o.after != nil {
		problems = append(problems, o.after(ctx)...)
	}
	for _, id := range g.ids {
		if g.c.nodes[id].crashed() {
			err = errors.Join(err, fmt.Errorf("node %s exited by itself", id))
		}
	}
	problems = append(problems, g.newProblems()...)
	if err != nil || len(problems) > 0 || len(o.liveness) > 0 {
		msg := fmt.Sprintf("%s: %s", where, o.what)
		for _, l := range o.liveness {
			msg += "\n\tliveness (during the step): " + l
		}
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
		extra := ""
		if o.crowd != nil {
			extra = "; " + o.crowd.report(r)
		}
		r.t.Logf("%s: %s; all acting %v after healing, workers following after %v (step %v)%s", where, o.what,
			acting.Round(time.Millisecond), following.Round(time.Millisecond), time.Since(o.started).Round(time.Millisecond), extra)
	}
	r.compact(ctx)
	return nil
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
