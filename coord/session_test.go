package coord_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/testutil"
)

func newSession(t *testing.T, cli *clientv3.Client, ttl time.Duration, onLease func(context.Context, clientv3.LeaseID) error) *coord.Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := coord.NewSession(ctx, coord.SessionConfig{Client: cli, TTL: ttl, OnLease: onLease, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatalf("new session: %v", err)
	}
	t.Cleanup(func() { hooks.AbandonSession(s) })
	return s
}

func TestSessionConfigErrorsNameTheField(t *testing.T) {
	e := testutil.Etcd(t, 1)
	for _, tc := range []struct {
		cfg  coord.SessionConfig
		want string
	}{
		{coord.SessionConfig{}, "SessionConfig.Client is nil"},
		{coord.SessionConfig{Client: e.Client(), TTL: 500 * time.Millisecond}, "SessionConfig.TTL (500ms): must be at least 1s"},
		{coord.SessionConfig{Client: e.Client(), TTL: 1500 * time.Millisecond}, "SessionConfig.TTL (1.5s): must be a whole number of seconds"},
		{coord.SessionConfig{Client: e.Client(), Margin: -time.Second}, "SessionConfig.Margin (-1s) must not be negative"},
		{coord.SessionConfig{Client: e.Client(), TTL: 2 * time.Second, RoundInterval: 1900 * time.Millisecond}, "SessionConfig.RoundInterval (1.9s) must be shorter than TTL (2s) minus Margin (200ms)"},
	} {
		_, err := coord.NewSession(context.Background(), tc.cfg)
		if !errors.Is(err, coord.ErrInvalidConfig) || !contains(err.Error(), tc.want) {
			t.Errorf("got %v, want an ErrInvalidConfig saying %q", err, tc.want)
		}
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func TestSessionUsesTheTTLEtcdGranted(t *testing.T) {
	// etcd with its default raft timings grants no lease below 2 s.
	e, err := etcdcluster.Start(etcdcluster.Config{Dir: t.TempDir(), Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	s, err := coord.NewSession(context.Background(), coord.SessionConfig{Client: e.Client(), TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	if s.TTL() != 2*time.Second || s.Epoch().TTL() != 2*time.Second {
		t.Fatalf("TTL = %v, epoch TTL = %v; want the granted 2s", s.TTL(), s.Epoch().TTL())
	}
	// The deadline derives from the granted TTL: now + 2s - 200ms at most.
	if left := time.Until(s.Epoch().Deadline()); left <= 0 || left > 1800*time.Millisecond {
		t.Fatalf("deadline %v away, want in (0, 1.8s]", left)
	}
}

func TestSessionCloseRevokesTheLease(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := e.Client()
	var leases []clientv3.LeaseID
	s := newSession(t, cli, time.Second, func(ctx context.Context, l clientv3.LeaseID) error {
		leases = append(leases, l)
		_, err := cli.Put(ctx, "/baton/servers/s1", "x", clientv3.WithLease(l))
		return err
	})
	ep := s.Epoch()
	if err := ep.Check(); err != nil {
		t.Fatalf("fresh session not confirmed: %v", err)
	}
	if len(leases) != 1 || leases[0] != s.Lease() || ep.Lease() != s.Lease() {
		t.Fatalf("OnLease saw %v, session lease %x", leases, s.Lease())
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(ep.Err(), coord.ErrSessionClosed) || !errors.Is(ep.Check(), coord.ErrSessionClosed) {
		t.Fatalf("epoch after Close: %v", ep.Err())
	}
	resp, _ := cli.Get(context.Background(), "/baton/servers/s1")
	if len(resp.Kvs) != 0 {
		t.Fatal("key bound to the lease survived Close")
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestNewSessionGivesUpWhenEtcdIsUnreachable(t *testing.T) {
	e := testutil.Etcd(t, 1)
	p, url := testutil.Proxy(t, e.Endpoint(0))
	cli := testutil.Client(t, e, url)
	p.BlackholeTx()
	p.BlackholeRx()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := coord.NewSession(ctx, coord.SessionConfig{Client: cli, TTL: time.Second})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("NewSession = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("NewSession took %v after its ctx ended", d)
	}
	p.UnblackholeTx()
	p.UnblackholeRx()
}

func TestSessionNoticesARevokeFromOutsideAndStartsANewLease(t *testing.T) {
	e := testutil.Etcd(t, 1)
	var mu sync.Mutex
	var leases []clientv3.LeaseID
	s := newSession(t, e.Client(), time.Second, func(_ context.Context, l clientv3.LeaseID) error {
		mu.Lock()
		defer mu.Unlock()
		leases = append(leases, l)
		return nil
	})
	ep := s.Epoch()
	interval := s.TTL() / 3

	revoked := time.Now()
	if _, err := e.Client().Revoke(context.Background(), ep.Lease()); err != nil {
		t.Fatal(err)
	}
	<-ep.Done()
	noticed := time.Since(revoked)
	if !errors.Is(ep.Err(), coord.ErrLeaseLost) {
		t.Fatalf("epoch ended with %v, want ErrLeaseLost", ep.Err())
	}
	t.Logf("revoke noticed after %v (round interval %v)", noticed, interval)
	if noticed > 2*interval {
		t.Errorf("revoke noticed after %v, more than one round interval (%v) plus slack", noticed, interval)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	next, err := s.NextEpoch(ctx, ep)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if next.Lease() == ep.Lease() || len(leases) != 2 || leases[1] != next.Lease() {
		t.Fatalf("new epoch lease %x, OnLease saw %v", next.Lease(), leases)
	}
}

func TestSessionSurvivesAnEtcdLeaderChange(t *testing.T) {
	e := testutil.Etcd(t, 3)
	cli := testutil.Client(t, e)
	s := newSession(t, cli, 2*time.Second, nil)
	lease := s.Lease()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	old, err := e.StopLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	newLeader, err := e.Leader(ctx)
	if err != nil || newLeader == old {
		t.Fatalf("new leader %d (old %d): %v", newLeader, old, err)
	}
	// Confirmations go on through the new leader: wait until a round that
	// started after the election has extended the deadline.
	elected := time.Now()
	testutil.Eventually(t, 5*time.Second, "a confirmation after the election", func() bool {
		ep := s.Epoch()
		return ep.Check() == nil && ep.Deadline().After(elected.Add(s.TTL()-s.Margin()))
	})
	if s.Lease() != lease {
		t.Fatalf("lease changed from %x to %x across a leader change", lease, s.Lease())
	}
	ttl, err := cli.TimeToLive(ctx, lease)
	if err != nil || ttl.TTL <= 0 {
		t.Fatalf("lease after leader change: %+v, %v", ttl, err)
	}
	if err := e.Restart(ctx, old); err != nil {
		t.Fatal(err)
	}
}
