package server_test

// Attempts to break Cordon/Uncordon and placement at the node level, on
// real embedded etcd.

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/etcdcluster"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// membership reads id's membership record and the lease it is bound to.
func membership(t testing.TB, e *etcdcluster.Cluster, id string) (coord.ServerRecord, clientv3.LeaseID, bool) {
	t.Helper()
	keys, _ := keyspace.New("")
	key, err := keys.Server(id)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := e.Client().Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return coord.ServerRecord{}, 0, false
	}
	rec, err := coord.DecodeServerRecord(resp.Kvs[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	return rec, clientv3.LeaseID(resp.Kvs[0].Lease), true
}

// Cordon and Uncordon are documented safe for concurrent use: after both
// return, the membership record must say what Cordoned says.
func TestBreakCordonConcurrentToggleAgreesWithEtcd(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range 300 {
		var wg sync.WaitGroup
		wg.Go(func() {
			if err := n.Cordon(ctx); err != nil {
				t.Error(err)
			}
		})
		wg.Go(func() {
			if err := n.Uncordon(ctx); err != nil {
				t.Error(err)
			}
		})
		wg.Wait()
		rec, _, ok := membership(t, e, "a")
		if !ok {
			t.Fatal("membership key gone")
		}
		if rec.Cordoned != n.Cordoned() {
			t.Fatalf("round %d: after concurrent Cordon and Uncordon returned, Cordoned() = %v but the membership record says cordoned = %v", i, n.Cordoned(), rec.Cordoned)
		}
	}
}

// A cordoned node whose lease changes registers cordoned under the new
// lease.
func TestBreakCordonSurvivesLeaseChange(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	old := n.Session().Lease()
	if _, err := e.Client().Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "a to register under a new lease", func() bool {
		_, lease, ok := membership(t, e, "a")
		return ok && lease != old && lease == n.Session().Lease()
	})
	if rec, _, _ := membership(t, e, "a"); !rec.Cordoned {
		t.Error("a cordoned node re-registered uncordoned under its new lease")
	}
}

// Cordon toggled at the moment a new lease registers: the registration
// reads the record, Cordon's rewrite (compared against the new lease)
// lands before the registration's put. After everything settles, the
// record must agree with Cordoned().
func TestBreakCordonRacesNewLeaseRegistration(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	for i := range 25 {
		want := i%2 == 0
		old := n.Session().Lease()
		if _, err := e.Client().Revoke(ctx, old); err != nil {
			t.Fatal(err)
		}
		// Toggle the moment the session has its new lease (set right
		// before the registration runs).
		deadline := time.Now().Add(10 * time.Second)
		for n.Session().Lease() == old {
			if time.Now().After(deadline) {
				t.Fatal("no new lease")
			}
		}
		var err error
		if want {
			err = n.Cordon(ctx)
		} else {
			err = n.Uncordon(ctx)
		}
		if err != nil {
			t.Fatal(err)
		}
		testutil.Eventually(t, 10*time.Second, "a to register under its new lease", func() bool {
			_, lease, ok := membership(t, e, "a")
			return ok && lease == n.Session().Lease()
		})
		if rec, _, _ := membership(t, e, "a"); rec.Cordoned != want || n.Cordoned() != want {
			t.Fatalf("round %d: Cordoned() = %v, want %v; the record under the new lease says cordoned = %v", i, n.Cordoned(), want, rec.Cordoned)
		}
	}
}

// A stopping node never writes its membership key again: Cordon after a
// drain began, or after a crash, leaves no key.
func TestBreakCordonNeverReRegistersAStoppingNode(t *testing.T) {
	e := testutil.Etcd(t, 1)
	a := startNode(t, e, "a")
	b := startNode(t, e, "b")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				a.Cordon(ctx)
			} else {
				a.Uncordon(ctx)
			}
		}
	})
	if err := a.Drain(ctx); err != nil {
		t.Logf("drain: %v", err)
	}
	close(stop)
	wg.Wait()
	if _, _, ok := membership(t, e, "a"); ok {
		t.Error("the drained node's membership key exists")
	}
	servertest.Crash(b)
	if err := b.Cordon(ctx); err != nil {
		t.Logf("cordon after crash: %v", err)
	}
	testutil.Eventually(t, 5*time.Second, "the crashed node's key to expire", func() bool {
		_, _, ok := membership(t, e, "b")
		return !ok
	})
	if err := b.Cordon(ctx); err != nil {
		t.Logf("cordon after crash: %v", err)
	}
	if _, _, ok := membership(t, e, "b"); ok {
		t.Error("a cordon after the crash wrote the membership key again")
	}
}

// A node drains right after a peer placed apps on it: every app acts
// somewhere else within TTL + 1 s, and no key names the drained node.
func TestBreakPlaceOnADrainingNode(t *testing.T) {
	e := testutil.Etcd(t, 1)
	nodes := map[string]*server.Node{}
	var list []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		nodes[id] = startNode(t, e, id)
		list = append(list, nodes[id])
	}
	a, b := nodes["a"], nodes["b"]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w := newWorker(t)
	var onB []int64
	for i := 0; len(onB) < 6 && i < 60; i++ {
		app, err := a.Registry().Register(ctx, "drain-"+strconv.Itoa(i))
		if err != nil {
			t.Fatal(err)
		}
		if preferred(app.ID, list, nil) != "b" {
			continue
		}
		onB = append(onB, app.ID)
	}
	drained := make(chan struct{})
	var start time.Time
	for i, app := range onB {
		addr := acquire(t, w, a.Addr(), app)
		if addr != b.Addr() {
			t.Fatalf("app %d placed at %s, want b", app, addr)
		}
		if i == len(onB)-1 {
			start = time.Now()
			go func() {
				defer close(drained)
				b.Drain(ctx)
			}()
		}
	}
	<-drained
	testutil.Eventually(t, time.Second+time.Second+500*time.Millisecond, "every app placed on b to act elsewhere", func() bool {
		for _, app := range onB {
			acting := 0
			for _, n := range []*server.Node{a, nodes["c"]} {
				if _, ok := n.Elector().Ownership(app); ok {
					acting++
				}
			}
			if acting != 1 {
				return false
			}
		}
		return true
	})
	t.Logf("all acting elsewhere %v after the drain began", time.Since(start))
}

// The asked server itself is cordoned: it places every app on the others,
// by their rank, and keeps none.
func TestBreakCordonedAskedServerStillPlacesElsewhere(t *testing.T) {
	e := testutil.Etcd(t, 1)
	var list []*server.Node
	for _, id := range []string{"a", "b", "c"} {
		list = append(list, startNode(t, e, id))
	}
	a := list[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "a to see itself cordoned", func() bool {
		rec, ok := a.Elector().Members().Get("a")
		return ok && rec.Cordoned
	})
	for app, id := range placedOwners(t, a, list, 30) {
		if id == "a" {
			t.Errorf("app %d placed on the cordoned asked server a", app)
		}
		if want := preferred(app, list[1:], nil); id != want {
			t.Errorf("app %d on %s, want %s", app, id, want)
		}
	}
}

// Deterministic form of the race above: the registration of a new lease
// has read the record (uncordoned) and its Txn is on its way, slow (held
// 200 ms before it leaves, as a slow link would); Cordon runs meanwhile.
// Its rewrite, compared against the new lease, finds no key yet and
// writes nothing ("the next registration carries the change") — but the
// registration in flight carries the old state. The record must end up
// cordoned.
func TestBreakCordonDuringASlowRegistration(t *testing.T) {
	e := testutil.Etcd(t, 1)
	keys, _ := keyspace.New("")
	key, _ := keys.Server("a")
	var armed, inFlight = make(chan struct{}, 1), make(chan struct{}, 1)
	cfg := coord.ClientConfig(e.Endpoints(), testutil.Logger(t))
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if r, ok := req.(*etcdserverpb.TxnRequest); ok && len(r.Compare) == 1 && string(r.Compare[0].Key) == key && r.Compare[0].Target == etcdserverpb.Compare_CREATE {
			select {
			case <-armed:
				inFlight <- struct{}{}
				time.Sleep(200 * time.Millisecond) // the slow link, not a wait for a condition
			default:
			}
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}))
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	n := startNode(t, e, "a", func(c *server.Config) { c.Client = cli })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	armed <- struct{}{}
	old := n.Session().Lease()
	if _, err := e.Client().Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inFlight:
	case <-ctx.Done():
		t.Fatal("no new registration")
	}
	if err := n.Cordon(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "a to register under its new lease", func() bool {
		_, lease, ok := membership(t, e, "a")
		return ok && lease == n.Session().Lease() && lease != old
	})
	if rec, _, _ := membership(t, e, "a"); !rec.Cordoned || !n.Cordoned() {
		t.Errorf("Cordon returned nil during the new lease's registration: Cordoned() = %v, but the record under the new lease says cordoned = %v", n.Cordoned(), rec.Cordoned)
	}
}
