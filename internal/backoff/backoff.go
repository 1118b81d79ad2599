// Package backoff computes jittered retry pauses and waits them out.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Jittered returns a pause for retry number attempt (0-based): a random
// duration in [d/2, d] where d = base·2^attempt, capped at max. Random
// spread keeps servers that collided once from colliding again.
func Jittered(attempt int, base, max time.Duration) time.Duration {
	d := base
	for i := 0; i < attempt && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	if d <= 1 {
		return d
	}
	half := d / 2
	return half + rand.N(d-half+1)
}

// Sleep waits for d or until ctx ends, whichever comes first, and returns
// ctx.Err() in the second case.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
