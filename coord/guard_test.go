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
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/keyspace"
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

func guardTrial(t *testing.T, e *etcdcluster.Cluster, trial int) (guardFired, leaseDeleted time.Time) {
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
	defer hooks.AbandonSession(s)

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

// stallableWatch is a watch of the owner keys attached to s that reports
// its progress to the session until stalled.
type stallableWatch struct {
	stalled  atomic.Bool
	requests atomic.Int64
	// drop is how many of the next progress requests to swallow, as
	// etcd does with a request that finds the stream unsynced.
	drop    atomic.Int64
	dropped chan struct{} // a send for each one swallowed
}

func attachStallableWatch(t *testing.T, cli *clientv3.Client, s *coord.Session) *stallableWatch {
	w := &stallableWatch{dropped: make(chan struct{}, 100)}
	ctx, cancel := context.WithCancel(context.Background())
	wctx := clientv3.WithRequireLeader(ctx)
	watch := cli.Watch(wctx, keyspaceOf(s).OwnerPrefix(), clientv3.WithPrefix())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for resp := range watch {
			if !w.stalled.Load() {
				hooks.WatchCaughtUp(s, resp.Header.Revision)
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	hooks.AttachWatch(s, func(context.Context) error {
		w.requests.Add(1)
		if w.drop.Add(-1) >= 0 {
			w.dropped <- struct{}{}
			return nil
		}
		w.drop.Store(0)
		return cli.RequestProgress(wctx)
	})
	return w
}

// stall stops the watch's reports and moves etcd's revision past what it
// reported (a stalled watch only matters then: nothing newer can have
// been missed before), and waits for the guard to fire.
func (w *stallableWatch) stall(t *testing.T, cli *clientv3.Client, ep *coord.Epoch, ttl time.Duration) {
	w.stalled.Store(true)
	if _, err := cli.Put(context.Background(), "/elsewhere", "moves the revision"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ep.Done():
	case <-time.After(3 * ttl):
		t.Fatal("guard did not fire while the watch was stalled")
	}
	if !errors.Is(ep.Err(), coord.ErrUnconfirmed) {
		t.Fatalf("epoch ended with %v, want ErrUnconfirmed", ep.Err())
	}
}

// With a watch attached (the elector's owner-key watch), a round
// confirms only once the watch reports it has delivered the round's read
// revision. A watch that stops reporting makes the guard fire although
// keepalives still succeed; when it reports again within a TTL a new
// epoch starts on the same lease.
func TestRoundsWaitForTheAttachedWatch(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := e.Client()
	s := newSession(t, cli, time.Second, nil)
	w := attachStallableWatch(t, cli, s)

	ep := s.Epoch()
	// Several TTLs pass with the watch reporting: the epoch holds.
	select {
	case <-ep.Done():
		t.Fatalf("epoch ended while the watch kept up: %v", ep.Err())
	case <-time.After(3 * s.TTL()):
	}
	if w.requests.Load() == 0 {
		t.Fatal("rounds never asked the watch for progress")
	}

	w.stall(t, cli, ep, s.TTL())
	// Keepalives go on meanwhile (TimeToLive says -1 once etcd has
	// dropped a lease) ...
	if ttl, err := cli.TimeToLive(context.Background(), ep.Lease()); err != nil || ttl.TTL < 0 {
		t.Fatalf("keepalives should have gone on: TTL %d, %v", ttl.TTL, err)
	}
	// ... and the watch reports again well within a TTL: same lease.
	w.stalled.Store(false)
	wait, stop := context.WithTimeout(context.Background(), 5*time.Second)
	defer stop()
	next, err := s.NextEpoch(wait, ep)
	if err != nil {
		t.Fatal(err)
	}
	if next.Lease() != ep.Lease() {
		t.Fatalf("new epoch on lease %x, want the same lease %x", next.Lease(), ep.Lease())
	}
}

// etcd drops a progress request that finds a watcher of the stream
// unsynced (behind for a moment under load, or just created), without an
// answer. A round must ask again rather than wait out its budget for an
// answer that will never come: asking once, it let the epoch's deadline
// pass and the guard fire on a healthy server, and under sustained load
// it did so round after round (BenchmarkScale at 10,000 workers).
func TestADroppedProgressRequestIsAskedAgain(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := e.Client()
	s := newSession(t, cli, time.Second, nil)
	w := attachStallableWatch(t, cli, s)
	ep := s.Epoch()
	for trial := range 2 {
		// A write outside the watched keys: the next round's read is past
		// what the watch has delivered, so that round needs progress.
		w.drop.Store(1)
		if _, err := cli.Put(context.Background(), "/elsewhere", fmt.Sprint(trial)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.dropped:
		case <-time.After(5 * s.TTL()):
			t.Fatal("no round asked for progress after the write")
		}
		// Two TTLs: the dropped request's round, and the next ones.
		select {
		case <-ep.Done():
			t.Fatalf("trial %d: guard fired after one dropped progress request: %v", trial, ep.Err())
		case <-time.After(2 * s.TTL()):
		}
	}
}

// A lease that etcd keeps alive (keepalives succeed) but that stays
// unconfirmed — here the watch never reports — is given up a TTL after
// its deadline: revoked, so its keys go and other servers take its apps,
// instead of being kept forever by a server that cannot act. A new lease
// follows, confirmed once the watch works again.
func TestALeaseKeptAliveButNeverConfirmedIsGivenUp(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := e.Client()
	var leases atomic.Int64
	s := newSession(t, cli, time.Second, func(context.Context, clientv3.LeaseID) error { leases.Add(1); return nil })
	w := attachStallableWatch(t, cli, s)
	ep := s.Epoch()
	w.stall(t, cli, ep, s.TTL())
	deadline := ep.Deadline() // the guard fired here

	var gone time.Time
	testutil.Eventually(t, 5*s.TTL(), "the unconfirmed lease to be given up", func() bool {
		ttl, err := cli.TimeToLive(context.Background(), ep.Lease())
		if err == nil && ttl.TTL < 0 {
			gone = time.Now()
			return true
		}
		return false
	})
	// Not before a whole TTL past the deadline, when the guard fired;
	// and soon after that (three TTLs is a bound a loaded machine keeps).
	if after := gone.Sub(deadline); after < s.TTL() || after > 3*s.TTL() {
		t.Errorf("lease given up %v after the guard fired; want between one and three TTLs (%v)", after, s.TTL())
	} else {
		t.Logf("lease given up %v after the guard fired (TTL %v)", after, s.TTL())
	}

	w.stalled.Store(false)
	wait, stop := context.WithTimeout(context.Background(), 10*time.Second)
	defer stop()
	next, err := s.NextEpoch(wait, ep)
	if err != nil {
		t.Fatal(err)
	}
	if next.Lease() == ep.Lease() {
		t.Fatalf("new epoch on the given-up lease %x", ep.Lease())
	}
	if leases.Load() < 2 {
		t.Errorf("OnLease ran %d times; the new lease must be announced", leases.Load())
	}
}

func keyspaceOf(s *coord.Session) keyspace.Keys {
	k, _ := keyspace.New(s.Prefix())
	return k
}
