package election_test

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/testutil"
)

// addNodeTTL is addNode with a lease TTL of its own, so that servers of
// one test can run with different TTLs.
func (c *cluster) addNodeTTL(id string, ttl time.Duration, opts ...nodeOption) *node {
	c.t.Helper()
	saved := c.ttl
	c.ttl = ttl
	defer func() { c.ttl = saved }()
	return c.addNode(id, opts...)
}

// appWithSuccessor registers apps until one has want as its rendezvous
// successor among servers, and returns it.
func (c *cluster) appWithSuccessor(t testing.TB, want string, servers ...string) int64 {
	t.Helper()
	for i := range 64 {
		app := c.register(t, fmt.Sprintf("compound-%s-%d", want, i))[0]
		if s, _ := coord.Successor(app, servers); s == want {
			return app
		}
	}
	t.Fatalf("no app out of 64 has %s as its successor among %v", want, servers)
	return 0
}

// justConfirmed returns right after n's guard deadline moved forward: a
// fault injected now leaves n acting for almost a whole TTL - margin,
// the longest the contract allows.
func justConfirmed(t testing.TB, n *node) {
	t.Helper()
	before := n.session.Epoch().Deadline()
	testutil.Eventually(t, 5*time.Second, n.id+" to confirm its lease again", func() bool {
		ep := n.session.Epoch()
		return ep.Err() == nil && ep.Deadline().After(before)
	})
}

// cutOff holds every byte between n and etcd, both ways, in n's proxy,
// and stops n answering pings: n is alive but unreachable. The returned
// heal undoes both; it is also run when the test ends, and may be called
// more than once.
func (c *cluster) cutOff(t testing.TB, n *node) (heal func()) {
	t.Helper()
	if n.proxy == nil {
		t.Fatalf("%s does not talk to etcd through a proxy", n.id)
	}
	n.proxy.PauseTx()
	n.proxy.PauseRx()
	c.pinger.setDown(n.addr, true)
	heal = func() {
		n.proxy.UnpauseTx()
		n.proxy.UnpauseRx()
		c.pinger.setDown(n.addr, false)
	}
	t.Cleanup(heal) // runs before the node's own cleanup
	return heal
}

// crash stops n as server.Node.Kill does: the session stops without
// revoking its lease, and the elector closes with no time to hand
// anything over.
func crash(n *node) {
	hooks.AbandonSession(n.session)
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	n.el.Close(gone)
}

// ownerTxnHook returns a withClient constructor whose client calls the
// function stored in hook (once; it is cleared) right before it sends a
// Txn that writes key. The hook runs on the caller's goroutine before the
// request leaves, so a fault it injects into the node's proxy catches the
// request's response.
func ownerTxnHook(t testing.TB, hook *atomic.Pointer[func()], key string) func([]string) *clientv3.Client {
	return txnHook(t, hook, func(r *etcdserverpb.TxnRequest) bool { return writes(r, key) })
}

// overwriteTxnHook is ownerTxnHook for a Txn that writes key over an
// existing one: not an election's first request, which creates the key
// only if it is absent (and otherwise reads it).
func overwriteTxnHook(t testing.TB, hook *atomic.Pointer[func()], key string) func([]string) *clientv3.Client {
	return txnHook(t, hook, func(r *etcdserverpb.TxnRequest) bool { return writes(r, key) && !createsOnly(r, key) })
}

// txnHook returns a withClient constructor whose client calls the
// function stored in hook (once; it is cleared) right before it sends a
// Txn that match accepts.
func txnHook(t testing.TB, hook *atomic.Pointer[func()], match func(*etcdserverpb.TxnRequest) bool) func([]string) *clientv3.Client {
	return interceptingClient(t, func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if r, ok := req.(*etcdserverpb.TxnRequest); ok && match(r) {
			if f := hook.Swap(nil); f != nil {
				(*f)()
			}
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	})
}

// createsOnly reports whether r writes key only if it does not exist
// (a compare of its ModRevision with 0).
func createsOnly(r *etcdserverpb.TxnRequest, key string) bool {
	for _, c := range r.Compare {
		if bytes.Equal(c.Key, []byte(key)) && c.Target == etcdserverpb.Compare_MOD && c.GetModRevision() == 0 {
			return true
		}
	}
	return false
}

func writes(r *etcdserverpb.TxnRequest, key string) bool {
	for _, op := range r.Success {
		if p := op.GetRequestPut(); p != nil && bytes.Equal(p.Key, []byte(key)) {
			return true
		}
	}
	return false
}

// breakConnectionOnce is a ModifyRx function that replaces the first
// chunk it sees with an HTTP/2 frame header announcing a frame larger
// than any peer accepts, and passes everything after it: the client tears
// the connection down at once, losing every response in that chunk — a
// connection reset right after the request went out.
func breakConnectionOnce() func([]byte) []byte {
	var done atomic.Bool
	return func(data []byte) []byte {
		if done.Swap(true) {
			return data
		}
		return []byte{0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01}
	}
}

// lastCancel returns when server's last ownership of app ended, as the
// recorder stamped it.
func lastCancel(events []event, server string, app int64) (time.Time, bool) {
	var at time.Time
	for _, ev := range events {
		if ev.kind == "cancel" && ev.server == server && ev.app == app {
			at = ev.at
		}
	}
	return at, !at.IsZero()
}

// returnsWithin runs f and reports whether it returned within bound; if
// it did not, heal is called and f is waited for (up to limit) so that no
// goroutine outlives the test.
func returnsWithin(t *testing.T, bound, limit time.Duration, heal func(), f func()) (took time.Duration, ok bool) {
	t.Helper()
	done := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(done)
		f()
	}()
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case <-done:
		return time.Since(start), true
	case <-timer.C:
	}
	heal()
	select {
	case <-done:
	case <-time.After(limit):
		t.Fatalf("still blocked %v after healing", limit)
	}
	return time.Since(start), false
}
