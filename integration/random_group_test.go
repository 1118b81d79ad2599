package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/worker"
)

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
