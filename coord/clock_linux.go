package coord

import "golang.org/x/sys/unix"

// bootNow reads CLOCK_BOOTTIME: monotonic, and counting suspended time.
func bootNow() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		panic("coord: CLOCK_BOOTTIME unreadable: " + err.Error())
	}
	return ts.Nano()
}
