package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/internal/backoff"
)

// The drain steps: a node leaves for good through POST /admin/drain —
//
//	drain-hangup      from a client that hangs up at once;
//	drain-lease-loss  then it is cut off from etcd for longer than its TTL;
//	drain-cut         it is cut off from etcd (before the request or
//	                  just after the drain began) for longer than its TTL
//	                  and healed while the drain still runs: its lease is
//	                  lost in the middle of the drain;
//	drain-fail-cut,   it is cut off from etcd, or paused (SIGSTOP), until
//	drain-fail-stop   the drain's own ctx (10 s) has expired: the drain
//	                  fails.
//
// Whatever happened, its apps must act elsewhere (checked during the
// step, with the group's workers following), and the drained node must
// own nothing and never come back into membership: no open interval, no
// acquire after its drain answered, no app in its /server/hello, no
// membership key, and no write of that key since the drain began. Then
// it is killed and started again, so that the group has three nodes for
// the next step; the liveness check after that is the step's settle.

// drainCtx is how long /admin/drain lets a drain run.
const drainCtx = 10 * time.Second

// drainStep runs the drain kind n (0–8) selects on a node that owns
// apps.
func (g *group) drainStep(ctx context.Context, n int) (outcome, error) {
	p := g.pickDrained()
	switch {
	case n < 2:
		return g.drainHangUp(ctx, p)
	case n < 4:
		return g.drainThenCut(ctx, p)
	case n < 7:
		return g.drainCutPastTTL(ctx, p)
	default: // the costly one: a drain's 10 s
		return g.drainFails(ctx, p)
	}
}

// pickDrained picks a node that acts for at least one app (any node if
// none does).
func (g *group) pickDrained() *proc {
	var owners []string
	for _, id := range g.ids {
		for _, servers := range g.c.check.owners() {
			if slices.Contains(servers, id) {
				owners = append(owners, id)
				break
			}
		}
	}
	if len(owners) == 0 {
		owners = g.ids
	}
	return g.c.nodes[owners[g.rng.IntN(len(owners))]]
}

// beginDrain describes the drain of p in o and starts watching p's
// membership key, which the drain must never write again.
func (g *group) beginDrain(ctx context.Context, p *proc, o *outcome, how string) (*memberWatch, error) {
	o.what = fmt.Sprintf("/admin/drain %s (TTL %v, %d apps)%s", p.id, g.c.ttlOf(p.id), g.actsFor(p), how)
	return g.c.watchMember(ctx, p.id)
}

// drainHangUp (drain-hangup): the request's client hangs up as soon as it
// has sent it; the drain must run to its end all the same. A second
// /admin/drain, sent once the node answers pings as draining, returns
// the one drain's outcome.
func (g *group) drainHangUp(ctx context.Context, p *proc) (outcome, error) {
	o := outcome{kind: "drain-hangup"}
	mw, err := g.beginDrain(ctx, p, &o, " from a client that hung up at once")
	if err != nil {
		return o, err
	}
	began := time.Now()
	if err := g.c.drainHangUp(p); err != nil {
		mw.stop()
		return o, err
	}
	if _, err := g.c.waitDraining(ctx, p, 5*time.Second); err != nil {
		o.liveness = append(o.liveness, fmt.Sprintf("%s: the hung-up drain did not begin: %v", p.id, err))
	}
	ans := g.c.adminDrain(ctx, p)
	o.what += ", " + ans.String()
	if !ans.ok {
		o.liveness = append(o.liveness, fmt.Sprintf("%s: the drain did not complete: %s", p.id, ans))
	}
	g.midLive(ctx, &o, began, "", "after the drain began")
	o.problems = append(o.problems, g.drained(ctx, p, ans, mw)...)
	return g.replaceDrained(ctx, o, p)
}

// drainThenCut (drain-lease-loss): a drain that completes, then the
// drained node is cut off from etcd for longer than its TTL and healed;
// it must not re-join nor take apps when it reaches etcd again.
func (g *group) drainThenCut(ctx context.Context, p *proc) (outcome, error) {
	o := outcome{kind: "drain-lease-loss"}
	ttl := g.c.ttlOf(p.id)
	mw, err := g.beginDrain(ctx, p, &o, "")
	if err != nil {
		return o, err
	}
	began := time.Now()
	ans := g.c.adminDrain(ctx, p)
	o.what += ", " + ans.String()
	if !ans.ok {
		o.liveness = append(o.liveness, fmt.Sprintf("%s: the drain did not complete: %s", p.id, ans))
	}
	g.midLive(ctx, &o, began, "", "after the drain began")
	hold := between(g.rng, ttl+200*time.Millisecond, ttl+1500*time.Millisecond)
	p.partition(true)
	err = backoff.Sleep(ctx, hold)
	p.partition(false)
	healed := time.Now()
	// Long enough for a session that still ran to notice its lost lease
	// and register again (its rounds run every TTL/3, a failed one is
	// retried within 100 ms).
	if err == nil {
		err = backoff.Sleep(ctx, max(ttl/3, 300*time.Millisecond))
	}
	if err != nil {
		mw.stop()
		return o, err
	}
	o.what += fmt.Sprintf(", then cut off from etcd for %v", hold.Round(time.Millisecond))
	g.midLive(ctx, &o, healed, "", "after the drained node reached etcd again")
	o.problems = append(o.problems, g.drained(ctx, p, ans, mw)...)
	return g.replaceDrained(ctx, o, p)
}

// drainCutPastTTL (drain-cut): the node is cut off from etcd before its
// drain request or just after the drain began, for longer than its TTL
// but not as long as the drain may run: its lease is lost during the
// drain, its apps go to others by expiry, and the drain goes on when it
// reaches etcd again.
func (g *group) drainCutPastTTL(ctx context.Context, p *proc) (outcome, error) {
	o := outcome{kind: "drain-cut", compound: true}
	ttl := g.c.ttlOf(p.id)
	mw, err := g.beginDrain(ctx, p, &o, "")
	if err != nil {
		return o, err
	}
	hold := between(g.rng, ttl+500*time.Millisecond, ttl+2*time.Second)
	answer, cut := g.drainUnder(ctx, p, &o, func() { p.partition(true) }, "cut off from etcd")
	g.midLive(ctx, &o, cut, p.id, "after the drained node was cut off")
	err = backoff.Sleep(ctx, hold-time.Since(cut))
	p.partition(false)
	healed := time.Now()
	o.what += fmt.Sprintf(" for %v", hold.Round(time.Millisecond))
	ans := waitAnswer(ctx, answer, drainCtx+5*time.Second)
	o.what += ", " + ans.String()
	if err != nil {
		mw.stop()
		return o, err
	}
	g.midLive(ctx, &o, healed, "", "after the drained node reached etcd again")
	o.problems = append(o.problems, g.drained(ctx, p, ans, mw)...)
	return g.replaceDrained(ctx, o, p)
}

// drainFails (drain-fail-cut, drain-fail-stop): the node is cut off from
// etcd (before its drain request or just after the drain began) or
// paused just after the drain began, until the drain's ctx has expired:
// the drain fails, and the node's apps go to others when its lease
// expires.
func (g *group) drainFails(ctx context.Context, p *proc) (outcome, error) {
	stop := g.rng.IntN(2) == 0
	o := outcome{kind: "drain-fail-cut", compound: true}
	fault, heal, how := func() { p.partition(true) }, func() { p.partition(false) }, "cut off from etcd"
	if stop {
		o.kind = "drain-fail-stop"
		fault, heal, how = func() { p.signal(syscall.SIGSTOP) }, func() { p.signal(syscall.SIGCONT) }, "paused (SIGSTOP)"
	}
	mw, err := g.beginDrain(ctx, p, &o, "")
	if err != nil {
		return o, err
	}
	began := time.Now()
	answer, faulted := g.drainUnder(ctx, p, &o, fault, how)
	g.midLive(ctx, &o, faulted, p.id, "after the drained node was "+strings.Fields(how)[0])
	var ans drainAnswer
	if stop {
		// A paused node cannot answer: resume it once its drain's ctx
		// has expired.
		err = backoff.Sleep(ctx, time.Until(began.Add(drainCtx+300*time.Millisecond)))
		heal()
		ans = waitAnswer(ctx, answer, 5*time.Second)
	} else {
		// The node answers HTTP: the drain's failure comes back while it
		// is still cut off.
		ans = waitAnswer(ctx, answer, drainCtx+5*time.Second)
		heal()
	}
	healed := time.Now()
	o.what += fmt.Sprintf(" until the drain answered, %s", ans)
	if ans.ok {
		o.what += " (it finished before the fault)"
	}
	if err != nil {
		mw.stop()
		return o, err
	}
	g.midLive(ctx, &o, healed, "", "after the drained node was healed")
	o.problems = append(o.problems, g.drained(ctx, p, ans, mw)...)
	return g.replaceDrained(ctx, o, p)
}

// drainUnder sends /admin/drain to p with fault applied either before
// the request or just after the drain began (the node answers pings as
// draining), and returns where the drain's answer will arrive and when
// the fault began.
func (g *group) drainUnder(ctx context.Context, p *proc, o *outcome, fault func(), how string) (<-chan drainAnswer, time.Time) {
	answer := make(chan drainAnswer, 1)
	first := g.rng.IntN(2) == 0
	if first && how != "paused (SIGSTOP)" { // a paused node would not take the request
		fault()
		o.what += ", " + how + " just before"
		go func() { answer <- g.c.adminDrain(ctx, p) }()
		return answer, time.Now()
	}
	go func() { answer <- g.c.adminDrain(ctx, p) }()
	offset := between(g.rng, 0, 20*time.Millisecond)
	if _, err := g.c.waitDraining(ctx, p, 5*time.Second); err != nil {
		o.liveness = append(o.liveness, fmt.Sprintf("%s: the drain did not begin: %v", p.id, err))
	}
	backoff.Sleep(ctx, offset)
	fault()
	o.what += fmt.Sprintf(", %s %v after the drain began", how, offset.Round(time.Millisecond))
	return answer, time.Now()
}

// midLive checks the second promise in the middle of a step (from: when
// the drain or fault began, or when it healed; exclude as in look) with
// the group's workers; a failure is kept, with its diagnosis, for settle
// to report. The time to acting counts towards the run's longest from a
// healing, or from a drain or fault.
func (g *group) midLive(ctx context.Context, o *outcome, from time.Time, exclude, when string) {
	acting, waited, err := g.waitLive(ctx, from, from.Add(g.ttlMax+time.Second+slack), g.workers, exclude)
	if err != nil {
		o.liveness = append(o.liveness, fmt.Sprintf("%s: %v\n\t%s", when, err, g.diagnose(ctx)))
		return
	}
	where := fmt.Sprintf("%s step %d [%s%s] %s", g.name, g.step, o.kind, g.mixedTag(), when)
	if strings.Contains(when, "began") || exclude != "" {
		g.r.drainActing.note(acting, where) // from a drain or a fault, not a healing
	} else {
		g.r.acting.note(acting, where)
	}
	if acting > g.ttlMax+time.Second {
		g.r.t.Logf("%s: every app acting only %v (TTL + 1 s is %v; slack allowed); last missing: %s",
			where, acting.Round(time.Millisecond), g.ttlMax+time.Second, waited)
	}
	o.what += fmt.Sprintf(" (all acting %v %s)", acting.Round(time.Millisecond), when)
}

// replaceDrained kills the drained node and starts it again.
func (g *group) replaceDrained(ctx context.Context, o outcome, p *proc) (outcome, error) {
	g.c.kill(p)
	err := g.restart(p.id)
	o.healed = time.Now()
	o.what += ", killed and restarted"
	if err == nil {
		err = ctx.Err()
	}
	return o, err
}

// actsFor counts the apps p acts for.
func (g *group) actsFor(p *proc) int {
	n := 0
	for _, servers := range g.c.check.owners() {
		if slices.Contains(servers, p.id) {
			n++
		}
	}
	return n
}

// drained checks that p, drained, owns nothing and stays out of
// membership: no interval of p open, none begun after its drain answered
// (ans), no app in its /server/hello, no membership
// key, and no write of that key since the drain began (mw, stopped
// here). It waits up to the liveness bound for what may still be
// settling: end stamps on their way, a lease left to expire.
func (g *group) drained(ctx context.Context, p *proc, ans drainAnswer, mw *memberWatch) []string {
	key, _ := g.c.keys.Server(p.id)
	deadline := time.Now().Add(g.ttlMax + time.Second + slack)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var why []string
	for {
		why = why[:0]
		for app, ivs := range g.c.check.openIntervals() {
			for _, iv := range ivs {
				if iv.server == p.id {
					why = append(why, fmt.Sprintf("acts for app %d (token %d)", app, iv.token))
				}
			}
		}
		switch h := g.hellos(ctx, map[string]bool{p.id: true})[p.id]; {
		case h.err != nil:
			why = append(why, "its /server/hello failed: "+h.err.Error())
		case len(h.owned) > 0:
			why = append(why, fmt.Sprintf("its /server/hello lists %v", h.owned))
		}
		gctx, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := g.r.etcd.Client().Get(gctx, key)
		cancel()
		switch {
		case err != nil:
			why = append(why, "reading its membership key: "+err.Error())
		case len(resp.Kvs) > 0:
			why = append(why, fmt.Sprintf("its membership key %s exists (lease %x, revision %d)", key, resp.Kvs[0].Lease, resp.Kvs[0].ModRevision))
		}
		if len(why) == 0 || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	var problems []string
	for _, w := range why {
		problems = append(problems, fmt.Sprintf("%s: drained node %s %s", g.name, p.id, w))
	}
	if ans.mono != 0 {
		for _, iv := range g.c.check.begunAfter(p.id, ans.mono) {
			problems = append(problems, fmt.Sprintf("%s: drained node %s acquired app %d (token %d) after its drain answered", g.name, p.id, iv.app, iv.token))
		}
	}
	for _, put := range mw.stop() {
		when := "after its drain answered"
		if ans.err != nil {
			when = "while its drain ran"
		} else if d := ans.at.Sub(put.seen); d > 0 {
			when = fmt.Sprintf("while its drain ran, seen %v before the drain answered", d.Round(time.Millisecond))
		}
		problems = append(problems, fmt.Sprintf("%s: drained node %s came back into membership %s: %s written at revision %d, lease %x, seen at %s",
			g.name, p.id, when, key, put.rev, put.lease, put.seen.Format("15:04:05.000")))
	}
	return problems
}

// drainAnswer is what /admin/drain answered, and when.
type drainAnswer struct {
	ok   bool
	msg  string
	err  error
	took time.Duration
	at   time.Time // when it arrived
	mono int64     // the same on CLOCK_MONOTONIC; 0 if it did not arrive
}

func (a drainAnswer) String() string {
	switch {
	case a.err != nil:
		return fmt.Sprintf("drain not answered after %v: %v", a.took.Round(time.Millisecond), a.err)
	case a.ok:
		return fmt.Sprintf("drain done in %v", a.took.Round(time.Millisecond))
	default:
		return fmt.Sprintf("drain failed after %v: %s", a.took.Round(time.Millisecond), a.msg)
	}
}

// waitAnswer waits up to timeout for a drain's answer.
func waitAnswer(ctx context.Context, answer <-chan drainAnswer, timeout time.Duration) drainAnswer {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case a := <-answer:
		return a
	case <-t.C:
		return drainAnswer{err: fmt.Errorf("no answer within %v", timeout), took: timeout}
	case <-ctx.Done():
		return drainAnswer{err: ctx.Err()}
	}
}

// adminDrain posts /admin/drain to p and returns its answer (the one
// drain's outcome, however many ask).
func (c *cluster) adminDrain(ctx context.Context, p *proc) drainAnswer {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, drainCtx+5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+p.addr+"/admin/drain", nil)
	req.Header.Set("Authorization", "Bearer "+randomAdminToken)
	client := &http.Client{Transport: c.http.Transport} // no 5 s limit: a drain may take 10 s
	resp, err := client.Do(req)
	a := drainAnswer{err: err}
	if err == nil {
		var body struct {
			Success bool   `json:"success"`
			Message string `json:"message"`
		}
		a.err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		a.ok, a.msg = body.Success, body.Message
	}
	a.took = time.Since(start)
	if a.err == nil {
		a.at, a.mono = time.Now(), electiontest.MonoNow()
	}
	return a
}

// drainHangUp sends POST /admin/drain to p on a connection of its own and
// closes it at once, without reading the answer.
func (c *cluster) drainHangUp(p *proc) error {
	conn, err := net.DialTimeout("tcp", p.addr, time.Second)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(conn, "POST /admin/drain HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Length: 0\r\n\r\n", p.addr, randomAdminToken)
	conn.Close()
	return err
}

// waitDraining waits until p answers /friend/ping as draining (503): its
// drain has begun.
func (c *cluster) waitDraining(ctx context.Context, p *proc, timeout time.Duration) (time.Time, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.addr+"/friend/ping", nil)
		resp, err := c.http.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusServiceUnavailable {
				return time.Now(), nil
			}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-deadline.C:
			return time.Time{}, fmt.Errorf("%s still answers pings as serving after %v", p.id, timeout)
		}
	}
}

// memberWatch records every write of a node's membership key from the
// moment it was created.
type memberWatch struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	puts   []memberPut
}

// memberPut is one write of a membership key, as its watch saw it.
type memberPut struct {
	rev, lease int64
	seen       time.Time
}

// watchMember watches id's membership key from now on.
func (c *cluster) watchMember(ctx context.Context, id string) (*memberWatch, error) {
	key, err := c.keys.Server(id)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(ctx)
	wch := c.etcd.Client().Watch(wctx, key, clientv3.WithCreatedNotify())
	created := time.NewTimer(5 * time.Second)
	defer created.Stop()
	select {
	case resp := <-wch:
		if !resp.Created {
			cancel()
			return nil, fmt.Errorf("watch %s: not created: %v", key, resp.Err())
		}
	case <-created.C:
		cancel()
		return nil, fmt.Errorf("watch %s: not created within 5 s", key)
	}
	mw := &memberWatch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(mw.done)
		for resp := range wch {
			if err := resp.Err(); err != nil && wctx.Err() == nil {
				c.t.Logf("the watch of %s broke: %v", key, err)
			}
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypePut {
					mw.mu.Lock()
					mw.puts = append(mw.puts, memberPut{rev: ev.Kv.ModRevision, lease: ev.Kv.Lease, seen: time.Now()})
					mw.mu.Unlock()
				}
			}
		}
	}()
	return mw, nil
}

// stop ends the watch and returns the writes it saw.
func (mw *memberWatch) stop() []memberPut {
	mw.cancel()
	<-mw.done
	mw.mu.Lock()
	defer mw.mu.Unlock()
	return mw.puts
}
