// Package electiontest helps check, from outside, that an app's owners
// never overlap: EndedAt stamps exactly when an ownership ended, and
// MonoNow and Mono give stamps that compare across the processes of one
// machine, so a checker can order the intervals several server processes
// report.
package electiontest

import (
	"context"
	"time"

	"github.com/batonhq/baton/internal/endstamp"
)

// EndedAt reports when the ownership whose OnAcquire context is ctx ended:
// the earliest of the instant its elector ended it, the instant its
// session's epoch ended (the context is a child of the epoch's), and the
// guard deadline in force at either moment (after a pause the
// cancellation comes late, but Ownership.Check refused from the deadline
// on). It carries Go's monotonic reading, so it compares exactly with
// time.Now() values of this process. ok is false while ctx is live or if
// ctx is not an ownership context. Use it to stamp the end of an interval
// exactly, instead of when a goroutine waiting on ctx.Done happened to be
// scheduled.
func EndedAt(ctx context.Context) (at time.Time, ok bool) { return endstamp.Of(ctx) }
