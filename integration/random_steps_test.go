package integration

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/internal/backoff"
	"github.com/batonhq/baton/internal/testutil"
)

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
	err := backoff.Sleep(ctx, hold)
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
	hs := g.hellos(context.Background(), nil)
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
	if err := backoff.Sleep(ctx, offset); err != nil {
		healA()
		return o, err
	}
	faulted, healB := g.fault(b)
	o.what += fmt.Sprintf(", +%v %s, held %v", offset.Round(time.Millisecond), faulted, hold.Round(time.Millisecond))
	err := backoff.Sleep(ctx, hold)
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
	err := backoff.Sleep(ctx, offset)
	b.pauseRx(true)
	o.what = fmt.Sprintf("%s (TTL %v), %s asked for %d apps, its etcd answers held from +%v for %v (TTL %v)",
		hung, g.c.ttlOf(a.id), b.id, len(apps), offset.Round(time.Millisecond), hold.Round(time.Millisecond), g.c.ttlOf(b.id))
	if err == nil {
		err = backoff.Sleep(ctx, hold)
	}
	if g.rng.IntN(2) == 0 {
		b.pauseRx(false)
		healA()
	} else {
		healA()
		b.pauseRx(false)
	}
	o.healed = time.Now()
	o.pending = func() string { asked.Wait(); return "" }
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
	reg := testutil.Must(coord.NewRegistry(g.r.etcd.Client(), g.c.keys.Prefix()))
	app, err := reg.Register(ctx, name)
	if err != nil {
		return o, err
	}
	g.appName[app.ID] = name
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
		err = backoff.Sleep(ctx, offset)
		faulted, heal := g.fault(first)
		if err == nil {
			err = backoff.Sleep(ctx, hold)
		}
		err = errors.Join(err, heal())
		o.what += fmt.Sprintf(", +%v %s for %v", offset.Round(time.Millisecond), faulted, hold.Round(time.Millisecond))
	}
	second := g.c.nodes[g.ids[g.rng.IntN(3)]]
	asked.Go(func() { acquireAll(g.c, second, []int64{app.ID}, names) })
	o.what += ", " + second.id + " asked"
	if err == nil {
		err = backoff.Sleep(ctx, keep-time.Since(kept))
	}
	revoke := g.rng.IntN(2) == 0
	end, gone := f.end(revoke)
	// Until the lease can have expired (its last keepalive's TTL after
	// that keepalive was sent), the v2 server may still act: that is
	// part of this step, and its verdict must see who acted meanwhile.
	if err == nil {
		err = backoff.Sleep(ctx, time.Duration(end-electiontest.MonoNow()))
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
