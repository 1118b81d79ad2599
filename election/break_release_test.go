package election_test

// Attempts to break how a server gives an app up and releases its owner
// key (Resign, HandOver, transfer, owe/payDebts, the released tokens), on
// real embedded etcd, written by a reviewer who saw the design and the
// code, not the reasoning. Each pins a promise: the first broke it (an
// overlap of ~1.8 s, 4 runs of 4) until released tokens were forgotten
// only on a revision after them (Elector.forgetRelease).

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/internal/testutil"
)

// watchGate holds the responses of a node's owner watch on their way to
// the elector: while frozen, every response the client receives waits
// (in order) until thaw. The owner watch lags; nothing else does —
// unary answers (elections, reads, Txns) keep flowing, as they do when
// etcd's watch stream falls behind its unary traffic.
type watchGate struct {
	mu     sync.Mutex
	frozen bool
	thawed chan struct{}
	held   atomic.Int64 // responses waiting at the gate now
}

func newWatchGate() *watchGate { return &watchGate{thawed: make(chan struct{})} }

func (g *watchGate) freeze() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.frozen {
		g.frozen = true
		g.thawed = make(chan struct{})
	}
}

func (g *watchGate) thaw() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.frozen {
		g.frozen = false
		close(g.thawed)
	}
}

func (g *watchGate) wait() {
	g.mu.Lock()
	frozen, ch := g.frozen, g.thawed
	g.mu.Unlock()
	if frozen {
		g.held.Add(1)
		<-ch
		g.held.Add(-1)
	}
}

type gatedStream struct {
	grpc.ClientStream
	gate *watchGate
}

func (s *gatedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	s.gate.wait()
	return err
}

// heldDelete holds the first armed Txn that deletes a given key, as a
// request whose answer was lost may still be on its way: the caller
// blocks until release, then the request goes out.
type heldDelete struct {
	key     string
	armed   atomic.Bool
	held    chan struct{} // closed when the request is held
	release chan struct{}
	once    sync.Once
}

func newHeldDelete(key string) *heldDelete {
	return &heldDelete{key: key, held: make(chan struct{}), release: make(chan struct{})}
}

func (h *heldDelete) free() { h.once.Do(func() { close(h.release) }) }

func deletesKey(r *etcdserverpb.TxnRequest, key string) bool {
	for _, op := range r.Success {
		if d := op.GetRequestDeleteRange(); d != nil && string(d.Key) == key {
			return true
		}
	}
	return false
}

// gatedClient returns a withClient constructor whose client passes its
// owner watch's responses through gate and holds the armed delete of
// hd.key (either may be nil).
func gatedClient(t testing.TB, gate *watchGate, hd *heldDelete) func([]string) *clientv3.Client {
	return func(endpoints []string) *clientv3.Client {
		return dialWith(t, endpoints,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				if r, ok := req.(*etcdserverpb.TxnRequest); ok && hd != nil && deletesKey(r, hd.key) && hd.armed.CompareAndSwap(true, false) {
					close(hd.held)
					<-hd.release
					return invoker(context.WithoutCancel(ctx), method, req, reply, cc, opts...)
				}
				return invoker(ctx, method, req, reply, cc, opts...)
			}),
			grpc.WithChainStreamInterceptor(gate.ownerWatchInterceptor))
	}
}

// ownerWatchInterceptor passes the owner watch's stream (the one carrying
// baton-owner-watch metadata) through g; a nil g passes everything.
func (g *watchGate) ownerWatchInterceptor(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil || g == nil {
		return cs, err
	}
	md, _ := metadata.FromOutgoingContext(ctx)
	if len(md.Get("baton-owner-watch")) == 0 {
		return cs, err
	}
	return &gatedStream{ClientStream: cs, gate: g}, nil
}

// dialWith is a test node's etcd client with extra dial options
// (interceptors); it is closed when the test ends.
func dialWith(t testing.TB, endpoints []string, opts ...grpc.DialOption) *clientv3.Client {
	cfg := coord.ClientConfig(endpoints, testutil.Logger(t))
	cfg.DialOptions = append(cfg.DialOptions, opts...)
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// Was a BREAK: a release whose token is forgotten on a stale event. a's owner
// watch lags (its responses are held, well inside its guard's margin),
// while its unary traffic flows. Meanwhile:
//
//   - "handed back": b elects X (token T0) and hands it to a (T1, naming
//     a, HandedOverFrom T0);
//   - "after a deletion": b elects X (T0) and resigns it (deleted at D);
//     a elects X, creating T1.
//
// a learns of T1 from an answer (Elect finds its own key, or wins the
// creation) before its watch shows T0 or D: a pending ownership of T1.
// a resigns X: the ownership ends, released = T1, and the delete of T1 is
// sent — and held in flight, as a request whose answer was lost. Then a's
// watch catches up. Its first event, older than T1 (b's put at T0, or the
// deletion D), "shows the key changed" and drops released[X] — and the
// resignation with it (someone else owns it), or, after a deletion, the
// resignation period has passed. The next event, T1 naming a, is owned
// and acted on: under the very token whose release is in flight. The
// delete then reaches etcd; b takes X over from the deletion and acts at
// once, while a acts on until its watch shows the deletion (held again
// here: until its guard deadline).
func TestBreakReleaseStaleEventForgetsAnInFlightRelease(t *testing.T) {
	for _, how := range []string{"handed back", "after a deletion"} {
		t.Run(how, func(t *testing.T) {
			const ttl = 2 * time.Second
			c := newCluster(t, 1, ttl)
			x := c.appRanked(t, "a", "b")
			key := c.keys.Owner(x)
			gate := newWatchGate()
			t.Cleanup(gate.thaw)
			hd := newHeldDelete(key)
			t.Cleanup(hd.free)
			clock := newManualClock()
			a := c.addNode("a", withClient(gatedClient(t, gate, hd)),
				withConfig(func(cfg *election.Config) { election.SetClock(cfg, clock) }))
			b := c.addNode("b")

			justConfirmed(t, a)
			gate.freeze() // a's owner watch lags from here

			electOn(t, c, b, x)
			_, t0 := c.ownerOf(t, x)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			switch how {
			case "handed back":
				to, err := b.el.HandOver(ctx, x)
				if err != nil || to != "a" {
					t.Fatalf("b.HandOver(X) = %q, %v; want a", to, err)
				}
			case "after a deletion":
				if err := b.el.Resign(ctx, x); err != nil {
					t.Fatalf("b.Resign(X): %v", err)
				}
			}
			addr, err := a.el.Elect(ctx, x, coord.ProtocolHTTP, "")
			if err != nil || addr != a.addr {
				t.Fatalf("a.Elect(X) = %q, %v; want a", addr, err)
			}
			who, t1 := c.ownerOf(t, x)
			if who != "a" {
				t.Fatalf("X's key names %q after a's Elect; want a", who)
			}
			if gate.held.Load() == 0 {
				t.Fatalf("a's watch showed nothing yet? held responses: 0")
			}
			t.Logf("b wrote T0=%d; X's key names a at T1=%d; a's watch has not shown either", t0, t1)

			// a resigns X (its ownership of T1 is still pending); the
			// delete is held in flight.
			hd.armed.Store(true)
			resigned := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				resigned <- a.el.Resign(ctx, x)
			}()
			select {
			case <-hd.held:
			case <-time.After(10 * time.Second):
				t.Fatal("a's Resign never sent the delete")
			}
			if how == "after a deletion" {
				clock.Advance(3 * ttl) // the resignation period ends
			}
			gate.thaw() // a's watch catches up: T0 (or D), then T1

			// Does a act for X under T1 while its delete of T1 is in flight?
			acted := c.rec.wait(3*time.Second, func(evs []event) bool { return len(acquisitionsBy(evs, "a", x)) > 0 })
			if acted {
				t.Logf("a acts for X under %d while its delete of %d is in flight", t1, t1)
			}
			// The delete reaches etcd; a's watch lags again.
			justConfirmed(t, a)
			gate.freeze()
			hd.free()
			if err := <-resigned; err != nil {
				t.Logf("a.Resign: %v", err)
			}
			if !c.rec.wait(10*time.Second, func(evs []event) bool { return len(acquisitionsBy(evs, "b", x)) >= 2 }) {
				t.Logf("b did not take X over after the deletion: %v", acquisitionsOf(c.rec.snapshot(), x))
			}
			// Let a's guard end whatever it still acts for, then heal.
			testutil.Eventually(t, 10*time.Second, "a's guard to fire", func() bool { return a.session.Epoch().Err() != nil })
			gate.thaw()
			if who, _ := waitActing(t, c, x, 10*time.Second); who == "" {
				t.Error("nobody acts for X")
			}
			acq := acquisitionsOf(c.rec.snapshot(), x)
			t.Logf("acquisitions of X: %v", acq)
			if slices.ContainsFunc(acq, func(s string) bool { return s[0] == 'a' }) {
				t.Errorf("a acted for X under the token whose release was in flight: %v", acq)
			}
			c.rec.expectClean(t)
		})
	}
}

// PIN: a rebalancing move's Txn is held in the network past the move's
// deadline (unknown outcome); undoMove fences X off (a rewrites its own
// key, HandedOverFrom = the move's token), and the fence's answer is lost
// although etcd applied it. takeBack retries, finds the key naming a
// under its lease, and owns that token. Then the old move's Txn reaches
// etcd: it compares the replaced token and must fail. Then a's guard
// pauses and confirms again (reclaim). No overlap; X acts on a, never on
// t under the move.
func TestBreakReleaseFenceAnswerLostThenTheOldMoveArrives(t *testing.T) {
	const ttl, settle = time.Second, 500 * time.Millisecond
	c := newCluster(t, 1, ttl)
	app := c.appRanked(t, "t", "a", "b")
	key := c.keys.Owner(app)

	var moveArmed, fenceArmed atomic.Bool
	held := make(chan *delayedTxn, 1)
	fenceLost := make(chan *etcdserverpb.TxnResponse, 1)
	intercept := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		r, ok := req.(*etcdserverpb.TxnRequest)
		switch {
		case ok && putsOwnerRecordFor(r, key, "t") && moveArmed.CompareAndSwap(true, false):
			d := &delayedTxn{release: make(chan struct{}), done: make(chan struct{}), resp: new(etcdserverpb.TxnResponse)}
			sendCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			go func() {
				defer cancel()
				defer close(d.done)
				<-d.release
				d.err = invoker(sendCtx, method, req, d.resp, cc, opts...)
			}()
			t.Cleanup(func() { _, _ = d.deliver() })
			held <- d
			<-ctx.Done()
			return status.FromContextError(ctx.Err()).Err()
		case ok && putsOwnerRecordFor(r, key, "a") && fenceArmed.CompareAndSwap(true, false):
			resp := new(etcdserverpb.TxnResponse)
			if err := invoker(ctx, method, req, resp, cc, opts...); err != nil {
				return err
			}
			fenceLost <- resp
			return status.Error(codes.Unavailable, "connection reset: response lost")
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	a := c.addNode("a", rebalancing(settle, 1), viaProxy(), withClient(interceptingClient(t, intercept)))
	c.addNode("b", rebalancing(settle, 1))
	electOn(t, c, a, app)
	_, token := c.ownerOf(t, app)
	moveArmed.Store(true)
	fenceArmed.Store(true)
	c.addNode("t", rebalancing(settle, 1))

	var d *delayedTxn
	select {
	case d = <-held:
	case <-time.After(20 * time.Second):
		t.Fatal("a never tried to move X to t")
	}
	var fresp *etcdserverpb.TxnResponse
	select {
	case fresp = <-fenceLost:
	case <-time.After(10 * time.Second):
		t.Fatal("a never fenced X off after its move timed out")
	}
	t.Logf("the fence succeeded=%v at %d; its answer was lost", fresp.Succeeded, fresp.Header.Revision)
	if !c.rec.wait(10*time.Second, func(evs []event) bool { return len(acquisitionsBy(evs, "a", app)) >= 2 }) {
		t.Fatalf("a never took X back after its fence: %v", acquisitionsOf(c.rec.snapshot(), app))
	}
	resp, err := d.deliver()
	if err != nil {
		t.Fatalf("the delayed move Txn: %v", err)
	}
	if resp.Succeeded {
		t.Errorf("the old move's Txn was applied at %d after the fence at %d (token %d)", resp.Header.Revision, fresp.Header.Revision, token)
	}
	justConfirmed(t, a)
	heal := c.cutOff(t, a)
	testutil.Eventually(t, 5*time.Second, "a's guard to fire", func() bool { return a.session.Epoch().Err() != nil })
	heal()
	if !c.rec.wait(20*time.Second, func([]event) bool {
		o := c.rec.owners()[app]
		id, _ := c.ownerOf(t, app)
		return len(o) == 1 && o[0] == id
	}) {
		id, tok := c.ownerOf(t, app)
		t.Fatalf("X does not end up acting where its key says: acting %v, key names %s@%d", c.rec.owners()[app], id, tok)
	}
	t.Logf("acquisitions of X: %v", acquisitionsOf(c.rec.snapshot(), app))
	c.rec.expectClean(t)
}
