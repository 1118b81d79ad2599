package coord_test

import (
	"errors"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// TestGuardCountsSuspendedTime: while a host is suspended, etcd's lease
// timers keep running on the etcd members, but Go's monotonic clock and
// its timers stand still. A resumed server must stop at once: Check
// refuses immediately, and the epoch ends (cancelling every ownership
// context) within one margin of the resume, although by Go's clock the
// deadline is still far away.
func TestGuardCountsSuspendedTime(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := testutil.Client(t, e)
	s := newSession(t, cli, 2*time.Second, nil)
	ep := s.Epoch()
	if err := ep.Check(); err != nil {
		t.Fatalf("fresh epoch: %v", err)
	}
	resumed := time.Now()
	coord.SuspendForTest(s, 2*s.TTL()) // the lease has expired in etcd by now
	if err := ep.Check(); !errors.Is(err, coord.ErrUnconfirmed) {
		t.Fatalf("Check right after a suspend longer than the TTL = %v; want ErrUnconfirmed", err)
	}
	select {
	case <-ep.Done():
	case <-time.After(s.Margin() + 2*time.Second): // a margin, plus room for a loaded machine
		t.Fatalf("epoch still open %v after the resume (deadline by Go's clock in %v)", time.Since(resumed), time.Until(ep.Deadline()))
	}
	at, ok := ep.EndedAt()
	if !ok {
		t.Fatal("ended epoch has no end stamp")
	}
	t.Logf("epoch ended %v after the resume (margin %v)", time.Since(resumed), s.Margin())
	if at.After(time.Now()) {
		t.Errorf("epoch end stamped in the future: %v", time.Until(at))
	}
}
