package coord

import "time"

// SuspendForTest advances s's guard clock by d without any time passing
// for Go's timers: what a host suspend of d does to CLOCK_BOOTTIME and to
// CLOCK_MONOTONIC.
func SuspendForTest(s *Session, d time.Duration) { s.clock.skipped.Add(int64(d)) }
