// Package monoclock reads CLOCK_MONOTONIC, which — unlike Go's own
// monotonic reading, whose origin is per process — is comparable across
// the processes of one machine. Ownership checkers use it to order events
// stamped by different server processes.
package monoclock

import (
	"time"

	"golang.org/x/sys/unix"
)

// anchor pairs a Go time (with its monotonic reading) with the
// CLOCK_MONOTONIC reading taken next to it.
var anchor = newAnchor()

type pair struct {
	goTime time.Time
	mono   int64
}

func newAnchor() pair {
	return pair{goTime: time.Now(), mono: Now()}
}

// Now returns CLOCK_MONOTONIC in nanoseconds.
func Now() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic("monoclock: CLOCK_MONOTONIC unreadable: " + err.Error())
	}
	return ts.Nano()
}

// Of converts a time.Time taken by this process (it must carry Go's
// monotonic reading, as time.Now() does) to CLOCK_MONOTONIC nanoseconds.
func Of(t time.Time) int64 {
	return anchor.mono + int64(t.Sub(anchor.goTime))
}
