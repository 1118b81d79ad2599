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
	"github.com/batonhq/baton/internal/hooks"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
)

// TestNewSessionReturnsWithinItsContext (found by review): NewSession (and so
// server.Node.Start, "blocks until etcd has confirmed the session or ctx
// ends") revokes the lease it granted when ctx ends first — with
// context.Background() bounded by the TTL, not by the caller's ctx. If
// etcd becomes unreachable right after the grant, NewSession returns up
// to a whole TTL (default 5 s) after its ctx ended.
func TestNewSessionReturnsWithinItsContext(t *testing.T) {
	e := testutil.Etcd(t, 1)
	p, url := testutil.Proxy(t, e.Endpoint(0))
	var armed atomic.Bool
	armed.Store(true)
	cfg := coord.ClientConfig([]string{url}, testutil.Logger(t))
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			err := invoker(ctx, method, req, reply, cc, opts...)
			if _, ok := req.(*etcdserverpb.LeaseGrantRequest); ok && armed.Swap(false) {
				p.PauseTx() // etcd unreachable from now on
				p.PauseRx()
			}
			return err
		}))
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	t.Cleanup(func() { p.UnpauseTx(); p.UnpauseRx() })
	keys, _ := keyspace.New("")

	const bound, slack = time.Second, time.Second
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	start := time.Now()
	s, err := coord.NewSession(ctx, coord.SessionConfig{Client: cli, Prefix: keys.Prefix(), TTL: 5 * time.Second, Logger: testutil.Logger(t)})
	took := time.Since(start)
	if s != nil {
		hooks.AbandonSession(s)
	}
	t.Logf("NewSession with a %v ctx returned after %v: %v", bound, took.Round(time.Millisecond), err)
	if took > bound+slack {
		t.Errorf("NewSession with a %v ctx and etcd unreachable returned after %v", bound, took.Round(time.Millisecond))
	}
}
