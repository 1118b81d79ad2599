//go:build !unix

package electiontest

import "time"

// start is the origin of this process's stamps.
var start = time.Now()

// MonoNow returns nanoseconds on a monotonic clock. Without
// CLOCK_MONOTONIC (this platform) its origin is this process's start, so
// it compares only within the process.
func MonoNow() int64 { return Mono(time.Now()) }

// Mono converts a time.Time taken by this process (it must carry Go's
// monotonic reading, as time.Now() and EndedAt's do) to MonoNow's scale.
func Mono(t time.Time) int64 { return int64(t.Sub(start)) }
