package coord_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
)

func serverSession(t *testing.T, ctx context.Context, cli *clientv3.Client, id string) (*coord.Session, error) {
	t.Helper()
	keys, _ := keyspace.New("")
	register, err := coord.MembershipOnLease(cli, keys.Prefix(), coord.ServerRecord{
		ServerID: id,
		Control:  coord.Endpoint{Address: id + ":7700"}, Protocols: coord.Protocols{coord.ProtocolHTTP: {Address: id + ":10010"}},
		StartedAt: time.Now(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return coord.NewSession(ctx, coord.SessionConfig{Client: cli, TTL: time.Second, OnLease: register, Logger: testutil.Logger(t)})
}

func memberIDs(m *coord.Members) []string {
	var ids []string
	for _, s := range m.Servers() {
		ids = append(ids, s.ServerID)
	}
	return ids
}

func TestMembersFollowSessionsAndCompaction(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := e.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	keys, _ := keyspace.New("")
	m, err := coord.WatchMembers(ctx, cli, keys.Prefix(), testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	s1, err := serverSession(t, ctx, cli, "s1")
	if err != nil {
		t.Fatal(err)
	}
	defer hooks.AbandonSession(s1)
	s2, err := serverSession(t, ctx, cli, "s2")
	if err != nil {
		t.Fatal(err)
	}
	defer hooks.AbandonSession(s2)
	testutil.Eventually(t, 5*time.Second, "both servers listed", func() bool {
		return slices.Equal(memberIDs(m), []string{"s1", "s2"})
	})
	if rec, ok := m.Get("s2"); !ok || rec.Control.Address != "s2:7700" || rec.Protocols[coord.ProtocolHTTP].Address != "s2:10010" {
		t.Fatalf("Get(s2) = %+v, %v", rec, ok)
	}
	succ, _ := m.Successor(7)
	if want, _ := coord.Successor(7, []string{"s1", "s2"}); succ.ServerID != want {
		t.Fatalf("Members.Successor = %s, coord.Successor = %s", succ.ServerID, want)
	}

	// A corrupt record is ignored, not fatal.
	bad, _ := keys.Server("bad")
	cli.Put(ctx, bad, "{")
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "s1 gone after Close", func() bool {
		return slices.Equal(memberIDs(m), []string{"s2"})
	})
}

// TestMembersRecoverFromCompaction: a watch whose etcd member goes away
// while the revisions it still needs are compacted comes back with
// ErrCompacted; Members reads the set again and goes on watching.
func TestMembersRecoverFromCompaction(t *testing.T) {
	e := testutil.Etcd(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	keys, _ := keyspace.New("")
	m, err := coord.WatchMembers(ctx, testutil.Client(t, e, e.Endpoint(0)), keys.Prefix(), testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	others := testutil.Client(t, e, e.Endpoint(1), e.Endpoint(2))

	if err := e.Stop(0); err != nil {
		t.Fatal(err)
	}
	s1, err := serverSession(t, ctx, others, "s1")
	if err != nil {
		t.Fatal(err)
	}
	defer hooks.AbandonSession(s1)
	put, _ := others.Put(ctx, "/elsewhere", "x")
	if _, err := others.Compact(ctx, put.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if err := e.Restart(ctx, 0); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 20*time.Second, "s1 seen after compaction", func() bool {
		return slices.Equal(memberIDs(m), []string{"s1"})
	})
	// The new watch follows later changes too.
	s2, err := serverSession(t, ctx, others, "s2")
	if err != nil {
		t.Fatal(err)
	}
	defer hooks.AbandonSession(s2)
	testutil.Eventually(t, 5*time.Second, "s2 seen", func() bool {
		return slices.Equal(memberIDs(m), []string{"s1", "s2"})
	})
}

func TestTwoLiveServersNeverShareAnID(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := e.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	first, err := serverSession(t, ctx, cli, "same")
	if err != nil {
		t.Fatal(err)
	}
	short, stop := context.WithTimeout(ctx, 700*time.Millisecond)
	_, err = serverSession(t, short, cli, "same")
	stop()
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, coord.ErrServerIDTaken) {
		t.Fatalf("second server with the same id: %v", err)
	}
	// Once the first is gone the id is free.
	first.Close(ctx)
	second, err := serverSession(t, ctx, cli, "same")
	if err != nil {
		t.Fatal(err)
	}
	second.Close(ctx)
}
