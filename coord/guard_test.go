package coord_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// TestGuardFiresBeforeEtcdExpiresTheLease is the heart of the session: cut
// the session off from etcd (its connection goes through etcd's proxy,
// which blackholes it) and watch, from a client that is not cut off, for
// etcd to delete a key bound to the session's lease. The guard must end
// the epoch strictly before that deletion, every time. Both instants are
// read from this process's monotonic clock.
func TestGuardFiresBeforeEtcdExpiresTheLease(t *testing.T) {
	const trials = 10
	e := testutil.Etcd(t, 1)
	var margins []time.Duration
	for i := range trials {
		guardFired, leaseDeleted := guardTrial(t, e, i)
		if !guardFired.Before(leaseDeleted) {
			t.Errorf("trial %d: guard fired %v after etcd deleted the lease's key", i, guardFired.Sub(leaseDeleted))
		}
		margins = append(margins, leaseDeleted.Sub(guardFired))
	}
	slices.Sort(margins)
	t.Logf("lease deleted minus guard fired over %d trials (TTL 2s): min %v, median %v, max %v",
		trials, margins[0], margins[len(margins)/2], margins[len(margins)-1])
}

func guardTrial(t *testing.T, e *coord.Embedded, trial int) (guardFired, leaseDeleted time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, url := testutil.Proxy(t, e.Endpoint(0))
	defer p.Close()
	cli, err := e.NewClient(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	s, err := coord.NewSession(ctx, coord.SessionConfig{Client: cli, TTL: 2 * time.Second, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Abandon()

	observer := e.Client()
	key := fmt.Sprintf("/guard/%d", trial)
	put, err := observer.Put(ctx, key, "bound to the session's lease", clientv3.WithLease(s.Lease()))
	if err != nil {
		t.Fatal(err)
	}
	watch := observer.Watch(ctx, key, clientv3.WithRev(put.Header.Revision+1))
	ep := s.Epoch()
	fired := make(chan time.Time, 1)
	go func() {
		select {
		case <-ep.Done():
			fired <- time.Now()
		case <-ctx.Done():
		}
	}()

	p.BlackholeTx()
	p.BlackholeRx()
	defer func() { p.UnblackholeTx(); p.UnblackholeRx() }()

	for leaseDeleted.IsZero() {
		resp, ok := <-watch
		if !ok {
			t.Fatalf("trial %d: watch ended before the lease expired: %v", trial, ctx.Err())
		}
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				leaseDeleted = time.Now()
			}
		}
	}
	select {
	case guardFired = <-fired:
	case <-ctx.Done():
		t.Fatalf("trial %d: guard never fired", trial)
	}
	if !errors.Is(ep.Err(), coord.ErrUnconfirmed) {
		t.Errorf("trial %d: epoch ended with %v, want ErrUnconfirmed", trial, ep.Err())
	}
	return guardFired, leaseDeleted
}

// TestGuardCheckIsCorrectBeforeAnyTimerFires: Check compares the clock
// with the deadline, so it refuses as soon as the deadline has passed even
// if the process was too busy for the guard timer to run.
func TestGuardCheckIsCorrectBeforeAnyTimerFires(t *testing.T) {
	e := testutil.Etcd(t, 1)
	p, url := testutil.Proxy(t, e.Endpoint(0))
	cli := testutil.Client(t, e, url)
	s := newSession(t, cli, time.Second, nil)
	p.BlackholeTx()
	p.BlackholeRx()
	defer func() { p.UnblackholeTx(); p.UnblackholeRx() }()
	ep := s.Epoch()
	testutil.Eventually(t, 5*time.Second, "the deadline to pass", func() bool { return !time.Now().Before(ep.Deadline()) })
	// Whether or not the timer has run yet, Check must refuse now.
	if err := ep.Check(); !errors.Is(err, coord.ErrUnconfirmed) {
		t.Fatalf("Check after the deadline = %v", err)
	}
}

// TestRoundsWaitForTheAttachedWatch: with a watch attached, a round
// confirms only once the watch reports it has delivered the round's read
// revision. A watch that stops reporting makes the guard fire although
// keepalives still succeed; when it reports again a new epoch starts on
// the same lease.
func TestRoundsWaitForTheAttachedWatch(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := e.Client()
	s := newSession(t, cli, time.Second, nil)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	wctx := clientv3.WithRequireLeader(ctx)
	watch := cli.Watch(wctx, s.Keys().OwnerPrefix(), clientv3.WithPrefix())
	var stalled atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		for resp := range watch {
			if !stalled.Load() {
				s.WatchCaughtUp(resp.Header.Revision)
			}
		}
	}()
	defer func() { cancel(); <-done }()
	var requests atomic.Int64
	s.AttachWatch(func(context.Context) error {
		requests.Add(1)
		return cli.RequestProgress(wctx)
	})

	ep := s.Epoch()
	// Several TTLs pass with the watch reporting: the epoch holds.
	select {
	case <-ep.Done():
		t.Fatalf("epoch ended while the watch kept up: %v", ep.Err())
	case <-time.After(3 * s.TTL()):
	}
	if requests.Load() == 0 {
		t.Fatal("rounds never asked the watch for progress")
	}

	// A stalled watch only matters once etcd's revision moves past what
	// it reported: nothing newer can have been missed before that.
	stalled.Store(true)
	if _, err := cli.Put(ctx, "/elsewhere", "moves the revision"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ep.Done():
	case <-time.After(3 * s.TTL()):
		t.Fatal("guard did not fire while the watch was stalled")
	}
	if !errors.Is(ep.Err(), coord.ErrUnconfirmed) {
		t.Fatalf("epoch ended with %v, want ErrUnconfirmed", ep.Err())
	}
	// Keepalives go on meanwhile: a TTL later the lease is still there
	// (TimeToLive says -1 once etcd has dropped it).
	select {
	case <-time.After(s.TTL() + 200*time.Millisecond):
	case <-ctx.Done():
	}
	if ttl, err := cli.TimeToLive(ctx, ep.Lease()); err != nil || ttl.TTL < 0 {
		t.Fatalf("keepalives should have gone on: TTL %d, %v", ttl.TTL, err)
	}

	stalled.Store(false)
	wait, stop := context.WithTimeout(ctx, 5*time.Second)
	defer stop()
	next, err := s.NextEpoch(wait, ep)
	if err != nil {
		t.Fatal(err)
	}
	if next.Lease() != ep.Lease() {
		t.Fatalf("new epoch on lease %x, want the same lease %x", next.Lease(), ep.Lease())
	}
}
