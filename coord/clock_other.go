//go:build !linux

package coord

import "time"

var processStart = time.Now()

// bootNow falls back to Go's monotonic clock where CLOCK_BOOTTIME does
// not exist; on such systems a host suspend is not accounted for (see the
// package documentation).
func bootNow() int64 { return int64(time.Since(processStart)) }
