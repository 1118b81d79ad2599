package election

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

// ownership is this server's claim on one app, from the write of its
// owner key (token) until the key changes or the lease goes. It is pending
// until it may act — after a takeover wait, and while the session's guard
// is unconfirmed — and active in between. All fields are guarded by the
// elector's mu.
type ownership struct {
	app, token int64
	lease      clientv3.LeaseID
	notBefore  time.Time // end of the takeover wait
	timer      interface{ Stop() bool }

	active bool
	ctx    context.Context
	cancel context.CancelFunc
	stamp  *endStamp // when ctx was cancelled
	epoch  *coord.Epoch
	since  time.Time
	ended  bool
}

// own records that this server holds app's owner key at revision token.
// wait is how long after now it may start acting (a takeover wait).
// Calling it again for the same token does nothing, and so does calling it
// for an app this server is resigning. Called with e.mu held.
func (e *Elector) own(app, token int64, lease clientv3.LeaseID, wait time.Duration) {
	if e.closed || e.resigningNow(app) {
		return
	}
	if o := e.mine[app]; o != nil {
		if o.token == token {
			return
		}
		e.lose(o, ReasonDeposed)
	}
	e.adopted(app)
	o := &ownership{app: app, token: token, lease: lease, notBefore: e.cfg.Clock.Now().Add(wait)}
	e.mine[app] = o
	if wait > 0 {
		e.logger.Debug("took the app over a live key; waiting out the previous owner's ttl", "app_id", app, "wait", wait)
		o.timer = e.cfg.Clock.AfterFunc(wait, func() {
			e.mu.Lock()
			defer e.mu.Unlock()
			e.tryActivate(o)
		})
		return
	}
	e.tryActivate(o)
}

// tryActivate starts acting for a pending ownership if its wait is over
// and the session's epoch is live on the ownership's lease; otherwise it
// stays pending (the timer or the next epoch tries again). Called with
// e.mu held.
func (e *Elector) tryActivate(o *ownership) {
	if o.ended || o.active || e.closed || e.mine[o.app] != o {
		return
	}
	if e.cfg.Clock.Now().Before(o.notBefore) {
		return // the takeover timer will call again
	}
	ep := e.session.Epoch()
	if ep.Check() != nil || ep.Lease() != o.lease {
		return // reclaim at the next epoch
	}
	o.stamp = &endStamp{}
	ctx, cancel := context.WithCancel(context.WithValue(e.ctx, endStampKey{}, o.stamp))
	o.ctx, o.cancel = ctx, cancel
	o.epoch, o.active, o.since = ep, true, time.Now()
	e.active++
	app, token := o.app, o.token
	e.logger.Debug("acquired", "app_id", app, "token", token)
	e.enqueue(app, func() {
		if e.cfg.Callbacks.OnAcquire != nil {
			e.cfg.Callbacks.OnAcquire(ctx, app, token)
		}
	})
	e.metrics.setOwned(e.active)
}

// suspend ends the acting part of an ownership because the guard fired,
// but keeps the claim: if the key is unchanged when confirmations resume,
// reclaim makes it active again with the same token. Called with e.mu
// held.
func (e *Elector) suspend(o *ownership) {
	if o.active {
		e.deactivate(o, ReasonLeaseUnconfirmed)
	}
}

// lose ends an ownership for good. Called with e.mu held.
func (e *Elector) lose(o *ownership, reason Reason) {
	if o.ended {
		return
	}
	o.ended = true
	if o.timer != nil {
		o.timer.Stop()
	}
	if e.mine[o.app] == o {
		delete(e.mine, o.app)
	}
	if o.active {
		e.deactivate(o, reason)
	}
}

// deactivate cancels the ownership's context at once and queues OnLose
// behind the app's earlier callbacks. Called with e.mu held.
func (e *Elector) deactivate(o *ownership, reason Reason) {
	o.active = false
	e.active--
	// The ownership ended at the earlier of now and its epoch's deadline:
	// after a pause (SIGSTOP, GC) the cancellation comes late, but the
	// owner stopped acting at the deadline (Check refuses from then on).
	end := min(time.Since(processStart), o.epoch.Deadline().Sub(processStart))
	o.stamp.at.Store(int64(end) + 1)
	o.cancel()
	app, token := o.app, o.token
	e.logger.Debug("lost", "app_id", app, "token", token, "reason", reason)
	e.enqueue(app, func() {
		if e.cfg.Callbacks.OnLose != nil {
			e.cfg.Callbacks.OnLose(app, token, reason)
		}
	})
	e.metrics.setOwned(e.active)
}

// callbackQueue holds one app's callbacks in order. A runner goroutine
// exists only while the queue is non-empty, so idle apps cost no
// goroutine.
type callbackQueue struct {
	fns []func()
}

// enqueue adds fn to app's queue, starting a runner if none is running.
// Called with e.mu held.
func (e *Elector) enqueue(app int64, fn func()) {
	if q := e.queues[app]; q != nil {
		q.fns = append(q.fns, fn)
		return
	}
	q := &callbackQueue{fns: []func(){fn}}
	e.queues[app] = q
	e.calls.Go(func() { e.runQueue(app, q) })
}

func (e *Elector) runQueue(app int64, q *callbackQueue) {
	for {
		e.mu.Lock()
		if len(q.fns) == 0 {
			delete(e.queues, app)
			e.mu.Unlock()
			return
		}
		fn := q.fns[0]
		q.fns = q.fns[1:]
		e.mu.Unlock()
		fn()
	}
}

// Ownership describes one app this server owns.
type Ownership struct {
	App   int64
	Token int64     // the fencing token: the owner key's ModRevision
	Since time.Time // when this server started acting for the app
	ctx   context.Context
	epoch *coord.Epoch
}

// Check returns nil while the ownership lasts, checked against the clock:
// call it right before an action that must not happen after the ownership
// ended. It is right even after a pause (SIGSTOP, GC) during which no
// timer could run.
func (o Ownership) Check() error {
	if o.ctx == nil {
		return ErrNotOwner
	}
	if o.ctx.Err() != nil {
		return fmt.Errorf("%w: app %d ownership %d ended", ErrNotOwner, o.App, o.Token)
	}
	if err := o.epoch.Check(); err != nil {
		return fmt.Errorf("%w: app %d: %w", ErrNotOwner, o.App, err)
	}
	return nil
}

// Context returns a context cancelled when the ownership ends (the same
// one OnAcquire received).
func (o Ownership) Context() context.Context { return o.ctx }

// Owned returns the apps this server owns and acts for now, by app id.
func (e *Elector) Owned() []Ownership {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]Ownership, 0, len(e.mine))
	for _, o := range e.mine {
		if o.active {
			out = append(out, o.view())
		}
	}
	slices.SortFunc(out, func(a, b Ownership) int { return int(min(max(a.App-b.App, -1), 1)) })
	return out
}

func (o *ownership) view() Ownership {
	return Ownership{App: o.app, Token: o.token, Since: o.since, ctx: o.ctx, epoch: o.epoch}
}

// Ownership returns this server's active ownership of app.
func (e *Elector) Ownership(app int64) (Ownership, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if o := e.mine[app]; o != nil && o.active {
		return o.view(), true
	}
	return Ownership{}, false
}

// Token returns the fencing token of this server's active ownership of
// app.
func (e *Elector) Token(app int64) (int64, bool) {
	o, ok := e.Ownership(app)
	return o.Token, ok
}

// Fence returns a comparison that holds in an etcd Txn only while this
// server's current ownership of app lasts: the owner key's ModRevision is
// still the token. Put it in the If of every write the owner makes on the
// app's behalf. Fails with ErrNotOwner when this server does not own app.
func (e *Elector) Fence(app int64) (clientv3.Cmp, error) {
	o, ok := e.Ownership(app)
	if !ok {
		return clientv3.Cmp{}, fmt.Errorf("%w: app %d", ErrNotOwner, app)
	}
	return clientv3.Compare(clientv3.ModRevision(e.keys.Owner(app)), "=", o.Token), nil
}

// Healthy returns nil unless this server holds ownerships while its guard
// is unconfirmed: then it cannot act for them, and nobody else may yet.
// Wire it to a readiness or liveness probe.
func (e *Elector) Healthy() error {
	e.mu.Lock()
	n := len(e.mine)
	e.mu.Unlock()
	if n == 0 {
		return nil
	}
	if err := e.session.Check(); err != nil {
		return fmt.Errorf("election: %d apps held with the lease unconfirmed: %w", n, err)
	}
	return nil
}

// endStamp holds the instant an ownership's context was cancelled.
type endStamp struct{ at atomic.Int64 }

type endStampKey struct{}

// EndedAt reports when the ownership whose OnAcquire context is ctx ended:
// the earlier of the instant taken immediately before ctx was cancelled
// and the guard deadline in force at that moment (after a pause the
// cancellation comes late, but Ownership.Check refused from the deadline
// on). It carries Go's monotonic reading, so it compares exactly with
// time.Now() values of this process. ok is false while ctx is live or if
// ctx is not an ownership context. Ownership checkers use it to stamp the
// end of an interval exactly, instead of when a goroutine waiting on
// ctx.Done happened to be scheduled.
func EndedAt(ctx context.Context) (at time.Time, ok bool) {
	s, _ := ctx.Value(endStampKey{}).(*endStamp)
	if s == nil || ctx.Err() == nil {
		return time.Time{}, false
	}
	n := s.at.Load()
	return processStart.Add(time.Duration(n - 1)), n != 0
}

// processStart anchors end stamps on the monotonic clock.
var processStart = time.Now()
