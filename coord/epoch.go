package coord

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// An Epoch is one unbroken period during which a Session's guard holds:
// every moment of it is covered by a confirmation round, so the server may
// act as owner of what it holds under the lease. An epoch ends — Done is
// closed and Context cancelled — when its guard deadline passes without a
// newer confirmation, when the lease is lost, or when the session closes;
// it never restarts. When confirmations resume, the session starts a new
// Epoch (on the same lease if etcd still has it, else on a new one).
//
// An Epoch is safe for concurrent use.
type Epoch struct {
	clock    *bootClock
	lease    clientv3.LeaseID
	ttl      time.Duration
	deadline atomic.Int64 // bootClock nanoseconds; only grows
	ctx      context.Context
	cancel   context.CancelFunc

	endOnce sync.Once
	err     error     // set before ctx is cancelled
	endedAt time.Time // set before ctx is cancelled
}

func newEpoch(clock *bootClock, lease clientv3.LeaseID, ttl time.Duration, deadline int64) *Epoch {
	e := &Epoch{clock: clock, lease: lease, ttl: ttl}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	e.deadline.Store(deadline)
	return e
}

// Lease is the etcd lease the epoch's ownerships are bound to.
func (e *Epoch) Lease() clientv3.LeaseID { return e.lease }

// TTL is the lease TTL etcd granted (which may exceed the one asked for).
func (e *Epoch) TTL() time.Duration { return e.ttl }

// Done is closed by the session when the epoch ends. It never blocks
// anyone and is never reopened.
func (e *Epoch) Done() <-chan struct{} { return e.ctx.Done() }

// Context returns a context cancelled when the epoch ends. Work that may
// only run while the epoch lasts — an ownership's — belongs under it: it
// then ends with the epoch by construction, whoever notices the end first.
// Its Err is context.Canceled; Err here says why the epoch ended.
func (e *Epoch) Context() context.Context { return e.ctx }

// Err is nil while the epoch lasts, then says why it ended:
// ErrUnconfirmed, ErrLeaseLost or ErrSessionClosed.
func (e *Epoch) Err() error {
	if e.ctx.Err() == nil {
		return nil
	}
	return e.err
}

// Deadline is the instant the epoch ends unless a newer confirmation
// arrives first. It only moves forward.
func (e *Epoch) Deadline() time.Time { return e.clock.time(e.deadline.Load()) }

// EndedAt reports when the epoch ended: the earlier of the instant the
// session ended it and its deadline at that moment (after a pause the
// session notices late, but Check refused from the deadline on). ok is
// false while the epoch lasts.
func (e *Epoch) EndedAt() (at time.Time, ok bool) {
	if e.ctx.Err() == nil {
		return time.Time{}, false
	}
	return e.endedAt, true
}

// Check reports whether the server may still act under this epoch, by
// comparing the clock with the deadline. Call it right before an action
// that must not happen after the ownership ended: unlike Done, it is
// correct even when the process was paused (SIGSTOP, a long GC, a host
// suspend) and no timer has fired yet.
func (e *Epoch) Check() error {
	if err := e.Err(); err != nil {
		return err
	}
	if e.clock.now() >= e.deadline.Load() {
		return ErrUnconfirmed
	}
	return nil
}

// extend moves the deadline to d if that is later; it reports whether the
// epoch was still live at the moment of the call.
func (e *Epoch) extend(d int64) bool {
	if e.Check() != nil {
		return false
	}
	for {
		old := e.deadline.Load()
		if d <= old || e.deadline.CompareAndSwap(old, d) {
			return true
		}
	}
}

// end closes the epoch with err; later calls do nothing.
func (e *Epoch) end(err error) {
	e.endOnce.Do(func() {
		e.err = err
		e.endedAt = e.clock.past(min(e.clock.now(), e.deadline.Load()))
		e.cancel()
	})
}
