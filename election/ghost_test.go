package election_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// afterOwnerTxnHook is ownerTxnHook, except that the hook runs once the
// Txn's response has arrived, before the caller sees it: a slow
// goroutine, or a GC pause, between a write and the code that acts on it.
func afterOwnerTxnHook(t testing.TB, hook *atomic.Pointer[func()], key string) func([]string) *clientv3.Client {
	return func(endpoints []string) *clientv3.Client {
		cfg := coord.ClientConfig(endpoints, testutil.Logger(t))
		cfg.DialOptions = append(cfg.DialOptions,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				err := invoker(ctx, method, req, reply, cc, opts...)
				if r, ok := req.(*etcdserverpb.TxnRequest); ok && writes(r, key) {
					if f := hook.Swap(nil); f != nil {
						(*f)()
					}
				}
				return err
			}),
		)
		cli, err := clientv3.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cli.Close() })
		return cli
	}
}

// TestAnElectionAnsweredAfterItsWriteWasOverwrittenLeavesNoGhost: a's
// election Txn succeeds, but before attempt() records the ownership
// (e.own), a's watch has already shown a's key, then c's overwrite of it
// (a did not answer c's ping), and a lost that ownership. attempt() then
// calls own() with the old token: e.mine gets a pending ownership that can
// never act (the table is past its token) and that nothing removes until
// the app's key changes again or a new epoch starts. Elect on a takes the
// fast path on it and tells every worker that a is the owner, while c
// acts: PowerJob workers that ask their current server first stay on a,
// which runs nothing, indefinitely.
func TestAnElectionAnsweredAfterItsWriteWasOverwrittenLeavesNoGhost(t *testing.T) {
	c := newCluster(t, 1, time.Second)
	app := c.register(t, "x")[0]
	var hook atomic.Pointer[func()]
	a := c.addNode("a", withClient(afterOwnerTxnHook(t, &hook, c.keys.Owner(app))))
	cn := c.addNode("c")

	f := func() {
		// a's write is applied; a has not seen its response yet. c
		// displaces a (a does not answer c's pings) and acts once a has
		// seen the overwrite, stopped and deleted its marker.
		c.pinger.setDown(a.addr, true)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if addr, err := cn.el.Elect(ctx, app, coord.ProtocolHTTP, ""); err != nil || addr != cn.addr {
			t.Errorf("Elect on c = %q, %v", addr, err)
		}
		if !c.rec.wait(5*time.Second, func([]event) bool { _, ok := cn.el.Ownership(app); return ok }) {
			t.Error("c never acted")
		}
		c.pinger.setDown(a.addr, false)
	}
	hook.Store(&f)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addr, err := a.el.Elect(ctx, app, coord.ProtocolHTTP, "")
	t.Logf("a's election: %q, %v", addr, err)

	owner, token := c.ownerOf(t, app)
	_, cActs := cn.el.Ownership(app)
	t.Logf("owner key: %s@%d; c acts: %v", owner, token, cActs)
	time.Sleep(3 * c.ttl) // plenty of time for any cleanup
	bad := 0
	const asks = 10
	for range asks {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		addr, err := a.el.Elect(ctx, app, coord.ProtocolHTTP, "")
		cancel()
		if err == nil && addr == a.addr {
			bad++
		}
		time.Sleep(100 * time.Millisecond)
	}
	if bad > 0 {
		_, aActs := a.el.Ownership(app)
		t.Errorf("%d of %d Elect calls on a answered a's own address %v after c took the app (c acts: %v, a acts: %v, key names %s)",
			bad, asks, 3*c.ttl, cActs, aActs, owner)
	}
	c.rec.expectClean(t)
}
