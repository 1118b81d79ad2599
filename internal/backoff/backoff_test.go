package backoff

import (
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestJitteredStaysInItsBand(t *testing.T) {
	for attempt := 0; attempt < 10; attempt++ {
		want := min(10*time.Millisecond<<attempt, time.Second)
		for i := 0; i < 200; i++ {
			d := Jittered(attempt, 10*time.Millisecond, time.Second)
			if d < want/2 || d > want {
				t.Fatalf("attempt %d: %v outside [%v, %v]", attempt, d, want/2, want)
			}
		}
	}
}
