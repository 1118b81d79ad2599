package election

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/endstamp"
)

// ownership is this server's claim on one app, from the write of its
// owner key (token) until the key changes or the lease goes. It is pending
// until it may act (see mayAct) and active while it does. All fields are
// guarded by the elector's mu.
type ownership struct {
	app, token int64
	lease      clientv3.LeaseID

	active bool
	ctx    context.Context // a child of epoch's context
	cancel context.CancelFunc
	stamp  *endstamp.Stamp
	epoch  *coord.Epoch
	since  time.Time
	ended  bool
}

// own records that this server holds app's owner key at revision token.
// The ownership starts pending: callers try to activate it once the batch
// of changes they are applying is complete (a marker written in the same
// Txn as the key must be in the table first). Calling it again for the
// same token does nothing, and so does calling it for an app this server
// is resigning, or with a token the table has already seen replaced (an
// election's response can arrive after the watch showed its write
// overwritten), with a token this server has released (see
// Elector.released) or an older one, or with a token older than the
// ownership it holds. Called with e.mu held.
func (e *Elector) own(app, token int64, lease clientv3.LeaseID) *ownership {
	if e.closed || e.resigningNow(app) {
		return nil
	}
	if t, ok := e.released[app]; ok && token <= t {
		return nil // its release may still reach etcd, or it is older still
	}
	if k, ok := e.table[app]; e.rev >= token && (!ok || k.modRev != token) {
		return nil // already replaced or deleted
	}
	if o := e.mine[app]; o != nil {
		switch {
		case o.token == token:
			return o
		case o.token > token:
			// A lagging watch shows an older key of this server's after
			// an election's answer gave it a newer one: tokens only go
			// forward.
			return nil
		}
		e.lose(o, ReasonDeposed)
	}
	e.adopted(app)
	o := &ownership{app: app, token: token, lease: lease}
	e.mine[app] = o
	return o
}

// mayAct reports whether o may act, as far as the table shows: the watch
// has delivered o's own write (the table holds the key at o's token,
// naming this server under its lease), and no displacement marker for the
// app remains. Markers are only ever written with an overwrite of the
// owner key, so one that appears later ends o through that overwrite;
// the check at activation is enough. Called with e.mu held.
func (e *Elector) mayAct(o *ownership) bool {
	k, ok := e.table[o.app]
	return ok && k.modRev == o.token && e.isMine(k) && len(e.markers[o.app]) == 0
}

// tryActivate starts acting for a pending ownership if it may act and the
// session's epoch is live on the ownership's lease; otherwise it stays
// pending (a table change or the next epoch tries again). An ownership
// still marked active whose epoch has ended (its context already
// cancelled with that epoch) is settled first, so that it can be taken up
// again on the current one. Called with e.mu held.
func (e *Elector) tryActivate(o *ownership) {
	if o == nil || o.ended || e.closed || e.mine[o.app] != o {
		return
	}
	ep := e.session.Epoch()
	if o.active {
		if o.epoch.Err() == nil {
			return
		}
		e.deactivate(o, epochReason(o.epoch.Err()))
	}
	if ep.Check() != nil || ep.Lease() != o.lease || !e.mayAct(o) {
		return
	}
	o.stamp = endstamp.New(ep)
	ctx, cancel := context.WithCancel(o.stamp.Into(ep.Context()))
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

// epochReason is the reason an ownership ends when its epoch ends with
// err.
func epochReason(err error) Reason {
	switch {
	case errors.Is(err, coord.ErrLeaseLost):
		return ReasonLeaseLost
	case errors.Is(err, coord.ErrSessionClosed):
		return ReasonClosed
	default:
		return ReasonLeaseUnconfirmed
	}
}

// lose ends an ownership for good. Called with e.mu held.
func (e *Elector) lose(o *ownership, reason Reason) {
	if o.ended {
		return
	}
	o.ended = true
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
	end := earlier(time.Now(), o.epoch.Deadline())
	o.stamp.Set(end)
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
	if e == nil {
		return nil
	}
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
	if e == nil {
		return Ownership{}, false
	}
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
	if e == nil {
		return errNotStarted
	}
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

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
