//go:build unix

package electiontest

import (
	"time"

	"golang.org/x/sys/unix"
)

// anchor pairs a Go time (with its monotonic reading) with the
// CLOCK_MONOTONIC reading of the same instant.
var anchor = newAnchor()

type pair struct {
	goTime time.Time
	mono   int64
}

// newAnchor brackets a Go reading between two CLOCK_MONOTONIC readings
// and keeps the tightest of several tries, taking the bracket's middle: a
// preemption between two readings would otherwise shift every stamp.
func newAnchor() pair {
	best, width := pair{}, int64(-1)
	for range 20 {
		before := MonoNow()
		now := time.Now()
		after := MonoNow()
		if w := after - before; width < 0 || w < width {
			best, width = pair{goTime: now, mono: before + w/2}, w
		}
	}
	return best
}

// MonoNow returns CLOCK_MONOTONIC in nanoseconds. Unlike Go's monotonic
// reading, whose origin is per process, it compares across the processes
// of one machine.
func MonoNow() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic("electiontest: CLOCK_MONOTONIC unreadable: " + err.Error())
	}
	return ts.Nano()
}

// Mono converts a time.Time taken by this process (it must carry Go's
// monotonic reading, as time.Now() and EndedAt's do) to MonoNow's scale.
func Mono(t time.Time) int64 { return anchor.mono + int64(t.Sub(anchor.goTime)) }
