package coord

import (
	"sync/atomic"
	"time"
)

// bootClock is the guard's clock: nanoseconds since its creation on a
// clock that keeps counting while the host or VM is suspended
// (CLOCK_BOOTTIME on Linux; see bootNow). etcd's lease timers keep running
// on the etcd members while this host sleeps, so a deadline kept on Go's
// monotonic clock, which stops during a suspend, would let a resumed
// server act for the rest of its deadline after its lease expired.
// Elsewhere than Linux it falls back to Go's monotonic clock.
//
// Go's timers run on the monotonic clock, so after a suspend they fire
// late; the guard therefore never sleeps longer than its margin at a time
// (see Session.armGuard), and Epoch.Check reads this clock directly.
type bootClock struct {
	base   int64     // bootNow() at creation
	goBase time.Time // time.Now() at creation, for converting to time.Time
	// skipped is added to every reading: tests move it forward to model a
	// suspend, which advances this clock while Go's timers stand still.
	skipped atomic.Int64
}

func newBootClock() *bootClock { return &bootClock{base: bootNow(), goBase: time.Now()} }

func (c *bootClock) now() int64 { return bootNow() - c.base + c.skipped.Load() }

// time converts a reading to a time.Time on Go's monotonic clock, for
// reports and for comparisons with time.Now() within this process. The
// conversion is exact until the host is suspended; after a suspend the
// two clocks differ by the time spent suspended.
func (c *bootClock) time(n int64) time.Time { return c.goBase.Add(time.Duration(n)) }

// past converts a reading of an instant already passed to a time.Time
// that is never in the future: after a suspend, an instant that fell
// inside it maps to the resume (Go's clock stood still meanwhile), and
// one before it to up to the suspended time later than it was — late,
// never early, which is the safe side for the end of an ownership.
func (c *bootClock) past(n int64) time.Time {
	t, now := c.time(n), time.Now()
	if now.Before(t) {
		return now
	}
	return t
}
