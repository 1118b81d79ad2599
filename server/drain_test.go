package server_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// A drain that cannot finish — etcd unreachable, or a ctx that has
// already ended — must not strand the node's apps: the node stops looking
// alive at once (ping), revokes its lease (or lets it expire), and another
// server acts for every app within TTL + 1 s of the fault healing. A
// second Drain returns the first's outcome; the node never re-joins
// membership. (Before: the keys stayed on the live lease, the node kept
// answering pings, and nobody acted until Close.)
func TestADrainThatCannotFinishReleasesTheApps(t *testing.T) {
	for _, how := range []string{"cut off", "ended ctx"} {
		t.Run(how, func(t *testing.T) {
			e := testutil.Etcd(t, 1)
			keys, _ := keyspace.New("")
			reg := testutil.Must(coord.NewRegistry(e.Client(), keys.Prefix()))
			var apps []int64
			for _, name := range []string{"x", "y", "z"} {
				app, err := reg.Register(context.Background(), name)
				if err != nil {
					t.Fatal(err)
				}
				apps = append(apps, app.ID)
			}
			p, url := testutil.Proxy(t, e.Endpoint(0))
			s1 := startNode(t, e, "s1", func(c *server.Config) { c.Client = testutil.Client(t, e, url) })
			s2 := startNode(t, e, "s2")
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			for _, app := range apps {
				if addr, err := s1.Elector().Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil || addr != s1.Addr() {
					t.Fatalf("Elect on s1: %q, %v", addr, err)
				}
			}
			testutil.Eventually(t, 5*time.Second, "s2 to see s1 as a member", func() bool {
				_, ok := s2.Elector().Members().Get("s1")
				return ok
			})

			var err error
			healed := time.Now()
			if how == "cut off" {
				p.PauseTx()
				p.PauseRx()
				dctx, dcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
				err = s1.Drain(dctx)
				dcancel()
				p.UnpauseTx()
				p.UnpauseRx()
				healed = time.Now()
			} else {
				ended, end := context.WithCancel(context.Background())
				end()
				err = s1.Drain(ended)
			}
			if err == nil {
				t.Fatal("a drain that could not hand over reported success")
			}
			if again := s1.Drain(context.Background()); !errors.Is(again, err) && again.Error() != err.Error() {
				t.Errorf("second Drain = %v; want the first's %v", again, err)
			}
			if _, perr := (server.HTTPPinger{}).Ping(ctx, s1.ID(), coord.Endpoint{Address: s1.Addr()}); perr == nil {
				t.Error("a draining node still answers pings as alive")
			}
			// Within TTL + 1 s (plus a second for a loaded machine) s2 acts
			// for every app; workers asking s2 are sent to s2.
			testutil.Eventually(t, s2.Session().TTL()+2*time.Second, "s2 to act for every app", func() bool {
				return len(s2.Elector().Owned()) == len(apps)
			})
			t.Logf("s2 acts for every app %v after the fault", time.Since(healed).Round(time.Millisecond))
			for _, app := range apps {
				if addr, err := s2.Elector().Elect(ctx, app, coord.ProtocolHTTP, s1.Addr()); err != nil || addr != s2.Addr() {
					t.Errorf("Elect app %d on s2 = %q, %v; want s2", app, addr, err)
				}
			}
			if _, ok := s2.Elector().Members().Get("s1"); ok {
				t.Error("the drained node is still a member")
			}
		})
	}
}

// A node cut off from etcd as its drain begins, and back after etcd has
// expired its lease while the drain still runs, starts a fresh lease (its
// session does that by itself) but never writes its membership key again:
// peers must not hand it apps or send workers to it.
func TestADrainCutOffPastItsTTLNeverRejoinsMembership(t *testing.T) {
	e := testutil.Etcd(t, 1)
	keys, _ := keyspace.New("")
	app, err := testutil.Must(coord.NewRegistry(e.Client(), keys.Prefix())).Register(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	p, url := testutil.Proxy(t, e.Endpoint(0))
	s1 := startNode(t, e, "s1", func(c *server.Config) { c.Client = testutil.Client(t, e, url) })
	s2 := startNode(t, e, "s2")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s1.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	member, _ := keys.Server("s1")
	watch := e.Client().Watch(ctx, member, clientv3.WithCreatedNotify())
	<-watch // created

	p.PauseTx()
	p.PauseRx()
	drained := make(chan error, 1)
	go func() {
		dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer dcancel()
		drained <- s1.Drain(dctx)
	}()
	testutil.Eventually(t, 10*time.Second, "etcd to expire s1's lease", func() bool {
		resp, err := e.Client().Get(ctx, member)
		return err == nil && len(resp.Kvs) == 0
	})
	p.UnpauseTx()
	p.UnpauseRx()
	select {
	case err := <-drained:
		t.Logf("drain: %v", err)
	case <-ctx.Done():
		t.Fatal("the drain did not end")
	}
	testutil.Eventually(t, 5*time.Second, "s2 to act for the app", func() bool {
		_, ok := s2.Elector().Ownership(app.ID)
		return ok
	})
	// Everything the watch saw since before the drain, up to now (a
	// progress notification marks "now"): deletions only.
	end, err := e.Client().Put(ctx, "/marker", "x")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Client().RequestProgress(ctx); err != nil {
		t.Fatal(err)
	}
	for resp := range watch {
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypePut {
				t.Errorf("draining s1 re-joined membership: %s written at revision %d (lease %x)", member, ev.Kv.ModRevision, ev.Kv.Lease)
			}
		}
		if resp.Header.Revision >= end.Header.Revision {
			break
		}
	}
}
