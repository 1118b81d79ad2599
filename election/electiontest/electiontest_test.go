package electiontest_test

import (
	"context"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/batonhq/baton/election/electiontest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Mono puts a time.Time on MonoNow's scale: a stamp taken between two
// MonoNow readings falls between them.
func TestMonoAgreesWithMonoNow(t *testing.T) {
	for range 1000 {
		before := electiontest.MonoNow()
		at := electiontest.Mono(time.Now())
		after := electiontest.MonoNow()
		// The anchor pairs two readings taken a few hundred ns apart:
		// allow that much slack on either side.
		const slack = int64(50 * time.Microsecond)
		if at < before-slack || at > after+slack {
			t.Fatalf("Mono(time.Now()) = %d, outside [%d, %d]", at, before, after)
		}
	}
}

func TestEndedAtIsFalseForOtherContexts(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	if _, ok := electiontest.EndedAt(ctx); ok {
		t.Error("EndedAt of a live plain context is ok")
	}
	cancel()
	if _, ok := electiontest.EndedAt(ctx); ok {
		t.Error("EndedAt of a cancelled plain context is ok")
	}
}
