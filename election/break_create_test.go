package election_test

// Attempts to break the fused create (e708c25): an election's first
// request creates an absent owner key in the Txn that reads it (elect.go,
// attempt / readOwner), composed with other faults, on real embedded etcd.
// Tests that fail show a broken promise; the others pin a promise that
// held under the attack they describe.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
)

// createStep is what a test does with an election's fused create of key:
// send sends it (and fills the response); the error returned is what the
// client sees.
type createStep struct {
	key string // "" matches any owner key
	f   func(r *etcdserverpb.TxnRequest, resp *etcdserverpb.TxnResponse, send func() error) error
}

// isFusedCreate reports whether r is an election's create: it puts one
// owner key only if the key is absent (reading the app record with it,
// and, fused, otherwise reading both). It also matches the separate
// create of the code before the fused create, so that these tests run on
// both.
func isFusedCreate(c *cluster, r *etcdserverpb.TxnRequest) (string, bool) {
	if len(r.Success) == 0 || len(r.Success) > 2 || len(r.Success) == 2 && r.Success[1].GetRequestRange() == nil {
		return "", false
	}
	p := r.Success[0].GetRequestPut()
	if p == nil {
		return "", false
	}
	if _, err := c.keys.AppIDFromOwnerKey(string(p.Key)); err != nil || !createsOnly(r, string(p.Key)) {
		return "", false
	}
	return string(p.Key), true
}

// createClient returns a withClient constructor whose client hands the
// first fused create matching the stored step to it (once), and passes its
// owner watch's responses through gate (if not nil).
func createClient(t testing.TB, c *cluster, step *atomic.Pointer[createStep], gate *watchGate) func([]string) *clientv3.Client {
	return func(endpoints []string) *clientv3.Client {
		return dialWith(t, endpoints,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				send := func() error { return invoker(ctx, method, req, reply, cc, opts...) }
				r, ok := req.(*etcdserverpb.TxnRequest)
				if !ok {
					return send()
				}
				key, ok := isFusedCreate(c, r)
				if !ok {
					return send()
				}
				s := step.Load()
				if s == nil || s.key != "" && s.key != key || !step.CompareAndSwap(s, nil) {
					return send()
				}
				return s.f(r, reply.(*etcdserverpb.TxnResponse), send)
			}),
			grpc.WithChainStreamInterceptor(gate.ownerWatchInterceptor))
	}
}

var errLostAnswer = status.Error(codes.Unavailable, "connection reset: response lost")

// electAsync runs n.el.Elect(app) in the background; the answer arrives
// on the returned channel.
func electAsync(n *node, app int64, timeout time.Duration) <-chan string {
	out := make(chan string, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		addr, err := n.el.Elect(ctx, app, coord.ProtocolHTTP, "")
		out <- fmt.Sprintf("%q, %v", addr, err)
	}()
	return out
}

// ATTACK 1: the fused create is applied but its answer is lost, and then
//
//   - "another server elects": b runs Elect for X before c's retry;
//   - "cut off": c is cut off from etcd at once (its guard fires, its
//     lease ends, its key goes, X's successor b takes over), then healed;
//   - "cut off briefly": c is cut off for less than its guard's margin.
//
// Nobody overlaps, tokens grow, and X ends up acting where its key says.
func TestBreakCreateLostAnswerThenRace(t *testing.T) {
	for _, how := range []string{"another server elects", "cut off", "cut off briefly"} {
		t.Run(how, func(t *testing.T) {
			const ttl = time.Second
			c := newCluster(t, 1, ttl)
			x := c.register(t, "lost-"+how)[0]
			var step atomic.Pointer[createStep]
			b := c.addNode("b")
			cn := c.addNode("c", viaProxy(), withClient(createClient(t, c, &step, nil)))
			justConfirmed(t, cn)
			applied := make(chan int64, 1)
			var heal func()
			step.Store(&createStep{key: c.keys.Owner(x), f: func(r *etcdserverpb.TxnRequest, resp *etcdserverpb.TxnResponse, send func() error) error {
				err := send()
				if err != nil {
					t.Errorf("the fused create failed: %v", err)
					return err
				}
				switch how {
				case "another server elects":
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					addr, err := b.el.Elect(ctx, x, coord.ProtocolHTTP, "")
					cancel()
					t.Logf("b's Elect while c's answer is lost: %q, %v", addr, err)
					if err != nil || addr != cn.addr {
						t.Errorf("b's Elect = %q, %v; want c's address", addr, err)
					}
				case "cut off", "cut off briefly":
					heal = c.cutOff(t, cn)
				}
				applied <- 0
				return errLostAnswer
			}})
			answer := electAsync(cn, x, 3*time.Second)
			select {
			case <-applied:
			case <-time.After(10 * time.Second):
				t.Fatal("c's fused create never went out")
			}
			switch how {
			case "cut off":
				if !c.rec.wait(10*time.Second, func([]event) bool {
					o := c.rec.owners()[x]
					return len(o) == 1 && o[0] == "b"
				}) {
					t.Fatalf("b never took X over from cut-off c: acting %v", c.rec.owners()[x])
				}
				heal()
			case "cut off briefly":
				<-time.After(300 * time.Millisecond) // the fault's duration, inside c's margin
				heal()
			}
			t.Logf("c's Elect: %s", <-answer)
			who, _ := waitActing(t, c, x, 10*time.Second)
			t.Logf("X acts on %s; acquisitions %v", who, acquisitionsOf(c.rec.snapshot(), x))
			if how == "cut off" && who != "b" {
				t.Errorf("X acts on %s after c's lease ended; want b", who)
			}
			c.rec.expectClean(t)
		})
	}
}

// ATTACK 2: the fused create's answer comes late — after c, which learnt
// of its key from its watch and acts, has already given X up (Resign, or
// HandOver to b) and b acts. The late answer must not make c own X again
// (the token is released) nor acquire it beside b.
func TestBreakCreateAnswerArrivesAfterRelease(t *testing.T) {
	for _, how := range []string{"resign", "handover"} {
		t.Run(how, func(t *testing.T) {
			c := newCluster(t, 1, time.Second)
			x := c.appRanked(t, "c", "b")
			var step atomic.Pointer[createStep]
			b := c.addNode("b")
			cn := c.addNode("c", withClient(createClient(t, c, &step, nil)))
			answered := make(chan struct{})
			release := make(chan struct{})
			step.Store(&createStep{key: c.keys.Owner(x), f: func(r *etcdserverpb.TxnRequest, resp *etcdserverpb.TxnResponse, send func() error) error {
				err := send()
				close(answered)
				<-release
				return err
			}})
			answer := electAsync(cn, x, 20*time.Second)
			<-answered
			// c's watch shows its key: it acts.
			if !c.rec.wait(10*time.Second, func([]event) bool {
				o := c.rec.owners()[x]
				return len(o) == 1 && o[0] == "c"
			}) {
				t.Fatalf("c does not act for X from its watch: %v", c.rec.owners()[x])
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			switch how {
			case "resign":
				if err := cn.el.Resign(ctx, x); err != nil {
					t.Fatalf("Resign on c: %v", err)
				}
			case "handover":
				if to, err := cn.el.HandOver(ctx, x); err != nil || to != "b" {
					t.Fatalf("HandOver on c = %q, %v", to, err)
				}
			}
			if !c.rec.wait(10*time.Second, func([]event) bool {
				o := c.rec.owners()[x]
				return len(o) == 1 && o[0] == "b"
			}) {
				t.Fatalf("b does not act for X after c gave it up: %v", c.rec.owners()[x])
			}
			close(release)
			t.Logf("c's Elect, answered late: %s", <-answer)
			if c.rec.wait(1500*time.Millisecond, func(evs []event) bool { return len(acquisitionsBy(evs, "c", x)) >= 2 }) {
				t.Errorf("c acquired X again from its late answer: %v", acquisitionsOf(c.rec.snapshot(), x))
			}
			if _, ok := cn.el.Ownership(x); ok {
				t.Errorf("c acts for X after giving it up")
			}
			if who, _ := waitActing(t, c, x, 5*time.Second); who != "b" {
				t.Errorf("X acts on %s; want b", who)
			}
			_ = b
			c.rec.expectClean(t)
		})
	}
}

// ATTACK 3: a mass takeover's batch Txn (successor s) races the fused
// create of one of its orphans on c, whose answer is lost; c's create
// lands first, so the batch fails and s elects one by one. Every app ends
// up acting where its key says, without overlap.
func TestBreakCreateLostAnswerRacesBatchTakeover(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	a := c.addNode("a")
	var hook atomic.Pointer[func(*etcdserverpb.TxnRequest, func() error) error]
	c.addNode("s", withClient(batchTxnHook(t, c, "s", &hook)))
	var step atomic.Pointer[createStep]
	cn := c.addNode("c", withClient(createClient(t, c, &step, nil)))
	apps := c.registerN(t, 60)
	electAll(t, c, a, apps)
	raced := make(chan string, 1)
	f := func(r *etcdserverpb.TxnRequest, send func() error) error {
		app := batchApps(c, r)[0]
		lost := make(chan struct{})
		step.Store(&createStep{key: c.keys.Owner(app), f: func(_ *etcdserverpb.TxnRequest, _ *etcdserverpb.TxnResponse, send func() error) error {
			if err := send(); err != nil {
				return err
			}
			close(lost)
			return errLostAnswer
		}})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		addr, err := cn.el.Elect(ctx, app, coord.ProtocolHTTP, "")
		select {
		case <-lost:
		default:
			t.Errorf("c's Elect of %d sent no fused create", app)
		}
		raced <- fmt.Sprintf("app %d: %q, %v", app, addr, err)
		return send()
	}
	hook.Store(&f)
	crash(a)
	c.pinger.setDown(a.addr, true)
	select {
	case r := <-raced:
		t.Logf("c's lost-answer create raced s's batch: %s", r)
	case <-time.After(15 * time.Second):
		t.Fatal("s never took orphans over in a batch")
	}
	settledOn(t, c, apps, 20*time.Second)
	c.rec.expectClean(t)
}

// ATTACK 4a: elections of app ids that are not registered — while they are
// being registered, on three servers at once, and ids that never will be
// (0, negative, past the sequence). No owner key may exist for an app
// whose record did not exist before the key was created.
func TestBreakCreateUnregisteredAppsGetNoOwner(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	nodes := []*node{c.addNode("a"), c.addNode("b"), c.addNode("c")}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, id := range []int64{0, -1, 1, 2, 1 << 40} {
		for _, n := range nodes {
			if _, err := n.el.Elect(ctx, id, coord.ProtocolHTTP, ""); !errors.Is(err, election.ErrUnknownApp) {
				t.Errorf("Elect(%d) on %s: %v; want ErrUnknownApp", id, n.id, err)
			}
		}
	}
	// Register ids 1..40, one at a time, each while every server elects
	// it (and the next) at the same moment: a server remembers an id it
	// found unknown for a second, so each id is asked once per server.
	reg := testutil.Must(coord.NewRegistry(c.etcd.Client(), c.keys.Prefix()))
	for i := int64(1); i <= 40; i++ {
		var wg sync.WaitGroup
		start := make(chan struct{})
		for _, n := range nodes {
			for _, id := range []int64{i, i + 1000} {
				wg.Go(func() {
					<-start
					ectx, ecancel := context.WithTimeout(ctx, 2*time.Second)
					defer ecancel()
					_, _ = n.el.Elect(ectx, id, coord.ProtocolHTTP, "")
				})
			}
		}
		wg.Go(func() {
			<-start
			if _, err := reg.Register(ctx, fmt.Sprintf("app-%d", i)); err != nil {
				t.Errorf("register: %v", err)
			}
		})
		close(start)
		wg.Wait()
	}
	owners, err := c.etcd.Client().Get(ctx, c.keys.OwnerPrefix(), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range owners.Kvs {
		app, err := c.keys.AppIDFromOwnerKey(string(kv.Key))
		if err != nil {
			t.Errorf("owner key %s", kv.Key)
			continue
		}
		rec, err := c.etcd.Client().Get(ctx, c.keys.AppID(app), clientv3.WithRev(kv.CreateRevision))
		if err != nil {
			t.Fatal(err)
		}
		if len(rec.Kvs) == 0 {
			t.Errorf("app %d got an owner key at %d before it was registered", app, kv.CreateRevision)
		}
	}
	t.Logf("%d owner keys, each created after its app's record", len(owners.Kvs))
}

// ATTACK 4b: an app id whose record exists but cannot be decoded (the
// registry reports it as corrupt, coord.ErrCorruptRecord; the read path,
// registered(), refuses it). Before the fused create, Elect refused it
// like Place does; the fused create compares only that the record key
// exists, and makes the server its owner.
func TestBreakCreateCorruptAppRecordGetsNoOwner(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	a := c.addNode("a")
	c.register(t, "one")
	const id = 1000
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.etcd.Client().Put(ctx, c.keys.AppID(id), "{not a record"); err != nil {
		t.Fatal(err)
	}
	reg := testutil.Must(coord.NewRegistry(c.etcd.Client(), c.keys.Prefix()))
	_, rerr := reg.ByID(ctx, id)
	t.Logf("registry ByID(%d): %v", id, rerr)
	paddr, perr := a.el.Place(ctx, id, coord.ProtocolHTTP, "")
	t.Logf("Place(%d) on a: %q, %v", id, paddr, perr)
	addr, err := a.el.Elect(ctx, id, coord.ProtocolHTTP, "")
	t.Logf("Elect(%d) on a: %q, %v", id, addr, err)
	if who, tok := c.ownerOf(t, id); who != "" {
		t.Errorf("app %d, whose record is corrupt (registry: %v; Place: %v), got an owner: %s at %d (Elect: %q, %v)", id, rerr, perr, who, tok, addr, err)
	}
}

// ATTACK 5: the fused create goes out as c starts to drain (Close): it
// is sent after c has left membership, and lands while c hands over and
// stops. X must act on b (c's successor) within TTL + 1 s of c's close,
// and nobody overlaps.
func TestBreakCreateLandsWhileDraining(t *testing.T) {
	for _, lagging := range []bool{false, true} {
		t.Run(fmt.Sprintf("watch lagging=%v", lagging), func(t *testing.T) {
			const ttl = time.Second
			c := newCluster(t, 1, ttl)
			x := c.register(t, "drain")[0]
			var step atomic.Pointer[createStep]
			gate := newWatchGate()
			t.Cleanup(gate.thaw)
			b := c.addNode("b")
			cn := c.addNode("c", withClient(createClient(t, c, &step, gate)))
			closed := make(chan time.Time, 1)
			sent := make(chan struct{})
			step.Store(&createStep{key: c.keys.Owner(x), f: func(r *etcdserverpb.TxnRequest, resp *etcdserverpb.TxnResponse, send func() error) error {
				if lagging {
					gate.freeze()
				}
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					err := cn.el.Close(ctx)
					t.Logf("c's elector closed: %v", err)
					<-sent // the create has landed: c's lease was alive for it
					gate.thaw()
					err = cn.session.Close(ctx)
					t.Logf("c's session closed: %v", err)
					closed <- time.Now()
				}()
				testutil.Eventually(t, 5*time.Second, "c to leave membership", func() bool {
					_, listed := b.el.Members().Get("c")
					return !listed
				})
				err := send()
				close(sent)
				if err == nil {
					t.Logf("the create during the drain: succeeded=%v at %d", resp.Succeeded, resp.Header.Revision)
				}
				return err
			}})
			t.Logf("c's Elect during its drain: %s", <-electAsync(cn, x, 10*time.Second))
			var at time.Time
			select {
			case at = <-closed:
			case <-time.After(15 * time.Second):
				t.Fatal("c never closed")
			}
			who, took := waitActing(t, c, x, 10*time.Second)
			t.Logf("X acts on %s %v after c closed; acquisitions %v (%v since close)", who, took, acquisitionsOf(c.rec.snapshot(), x), time.Since(at))
			if who != "b" {
				t.Errorf("X acts on %s; want b", who)
			}
			if took > ttl+time.Second {
				t.Errorf("X had no acting owner for %v after c closed; want at most TTL + 1 s", took)
			}
			c.rec.expectClean(t)
		})
	}
}

// ATTACK 6: the fused create lands while c's guard is unconfirmed — c's
// owner watch is held (its unary traffic flows), so no round can confirm
// — and then either the watch comes back ("brief") or stays behind past
// a TTL after the deadline, so that c gives its lease up (revoking its
// key) and takes a new one ("past the lease"). Nobody overlaps; X ends up
// acting where its key says (c, or b after c's lease went).
func TestBreakCreateLandsWhileUnconfirmed(t *testing.T) {
	for _, how := range []string{"brief", "past the lease"} {
		t.Run(how, func(t *testing.T) {
			const ttl = time.Second
			c := newCluster(t, 1, ttl)
			x := c.appRanked(t, "c", "b")
			var step atomic.Pointer[createStep]
			gate := newWatchGate()
			t.Cleanup(gate.thaw)
			c.addNode("b")
			cn := c.addNode("c", withClient(createClient(t, c, &step, gate)))
			lease := cn.session.Lease()
			landed := make(chan struct{})
			step.Store(&createStep{key: c.keys.Owner(x), f: func(r *etcdserverpb.TxnRequest, resp *etcdserverpb.TxnResponse, send func() error) error {
				gate.freeze()
				testutil.Eventually(t, 5*time.Second, "c's guard to go unconfirmed", func() bool { return cn.session.Check() != nil })
				err := send()
				close(landed)
				return err
			}})
			answer := electAsync(cn, x, 10*time.Second)
			<-landed
			t.Logf("c's Elect (created while unconfirmed): %s", <-answer)
			switch how {
			case "brief":
				gate.thaw()
			case "past the lease":
				testutil.Eventually(t, 10*time.Second, "c to give its lease up", func() bool { return cn.session.Lease() != lease })
				if !c.rec.wait(10*time.Second, func([]event) bool {
					o := c.rec.owners()[x]
					return len(o) == 1 && o[0] == "b"
				}) {
					t.Errorf("b never took X over after c gave its lease up: %v", c.rec.owners()[x])
				}
				gate.thaw()
			}
			who, _ := waitActing(t, c, x, 10*time.Second)
			t.Logf("X acts on %s; acquisitions %v", who, acquisitionsOf(c.rec.snapshot(), x))
			c.rec.expectClean(t)
		})
	}
}

// ATTACK 7: c's lease changes between building the fused create (bound to
// the lease of the moment) and sending it: the lease is revoked, and c
// has started and confirmed a new one, before the Txn goes out. c must
// end up owning X under its new lease, or X must act elsewhere; never an
// owner key that names c under a lease it does not hold while nobody acts.
func TestBreakCreateLeaseChangesBeforeTheCreate(t *testing.T) {
	const ttl = time.Second
	c := newCluster(t, 1, ttl)
	x := c.appRanked(t, "c", "b")
	var step atomic.Pointer[createStep]
	c.addNode("b")
	cn := c.addNode("c", withClient(createClient(t, c, &step, nil)))
	old := cn.session.Lease()
	step.Store(&createStep{key: c.keys.Owner(x), f: func(r *etcdserverpb.TxnRequest, resp *etcdserverpb.TxnResponse, send func() error) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := c.etcd.Client().Revoke(ctx, old); err != nil {
			t.Errorf("revoke c's lease: %v", err)
		}
		testutil.Eventually(t, 10*time.Second, "c to confirm a new lease", func() bool {
			return cn.session.Lease() != old && cn.session.Check() == nil
		})
		err := send()
		t.Logf("the create under the revoked lease: %v", err)
		return err
	}})
	t.Logf("c's Elect: %s", <-electAsync(cn, x, 10*time.Second))
	who, _ := waitActing(t, c, x, 10*time.Second)
	resp, err := c.etcd.Client().Get(context.Background(), c.keys.Owner(x))
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("X's key: %v, %v", resp, err)
	}
	if who == "c" && clientv3.LeaseID(resp.Kvs[0].Lease) != cn.session.Lease() {
		t.Errorf("X's key names c under lease %x; c holds %x", resp.Kvs[0].Lease, cn.session.Lease())
	}
	t.Logf("X acts on %s; acquisitions %v", who, acquisitionsOf(c.rec.snapshot(), x))
	c.rec.expectClean(t)
}

// ATTACK 5b (was a BREAK: c's Close returned at once, owning nothing,
// and the key landed after it; a drain now waits for its elections in
// flight before its last read of the keys naming it): an election in
// flight when c's drain begins, whose create lands during the drain,
// c's session still open — as Elector.Close leaves it ("close it afterwards"). Its key
// names c under c's live lease; c's closed elector will never act for X
// nor pass it on (passOnIfUnwanted promises that for "an owner key naming
// this server that ... was written by an election that was still in
// flight when the drain began"), and other servers' elections find c's
// key and send workers to c. X must not be left without an acting owner
// for longer than TTL + 1 s while etcd is healthy.
func TestBreakCreateInFlightElectionOutlivesClose(t *testing.T) {
	const ttl = time.Second
	c := newCluster(t, 1, ttl)
	x := c.register(t, "outlives")[0]
	var step atomic.Pointer[createStep]
	b := c.addNode("b")
	cn := c.addNode("c", withClient(createClient(t, c, &step, nil)))
	closed := make(chan error, 1)
	step.Store(&createStep{key: c.keys.Owner(x), f: func(r *etcdserverpb.TxnRequest, resp *etcdserverpb.TxnResponse, send func() error) error {
		// The drain begins while the request is on its way: c leaves
		// membership (b's view no longer lists it) before it lands.
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			closed <- cn.el.Close(ctx)
		}()
		testutil.Eventually(t, 5*time.Second, "c to leave membership", func() bool {
			_, listed := b.el.Members().Get("c")
			return !listed
		})
		err := send()
		if err == nil {
			t.Logf("c's create landed during its drain: succeeded=%v at %d", resp.Succeeded, resp.Header.Revision)
		}
		return err
	}})
	t.Logf("c's Elect: %s", <-electAsync(cn, x, 10*time.Second))
	select {
	case err := <-closed:
		t.Logf("c's elector closed: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("c's Close did not return")
	}
	closedAt := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addr, err := b.el.Elect(ctx, x, coord.ProtocolHTTP, "")
	t.Logf("b's Elect after c closed: %q, %v", addr, err)
	if !c.rec.wait(ttl+time.Second, func([]event) bool { return len(c.rec.owners()[x]) == 1 }) {
		id, tok := c.ownerOf(t, x)
		t.Errorf("X has no acting owner %v after c's elector closed, etcd healthy: key names %q (token %d, c's lease alive: %v); b's Elect answers %q, %v",
			time.Since(closedAt).Round(time.Millisecond), id, tok, cn.session.Check() == nil, addr, err)
	}
	c.rec.expectClean(t)
}
