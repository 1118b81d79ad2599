package worker_test

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
)

// firstRequest is an HTTP transport that remembers when the worker first
// asked a server anything.
type firstRequest struct {
	mu sync.Mutex
	at time.Time
}

func (f *firstRequest) RoundTrip(r *http.Request) (*http.Response, error) {
	f.mu.Lock()
	if f.at.IsZero() {
		f.at = time.Now()
	}
	f.mu.Unlock()
	return http.DefaultTransport.RoundTrip(r)
}

func (f *firstRequest) when() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.at
}

// A Start that etcd answers late — its connection up, every request held
// — waits for etcd rather than asking the servers: a fleet started at
// once must not add an election's worth of server work per worker to an
// etcd that is only busy. Only after EtcdGrace does it ask the servers
// ("stays slow"); an etcd that answers before then is all it uses
// ("answers in time").
func TestStartWaitsForASlowEtcdBeforeAskingTheServers(t *testing.T) {
	for _, how := range []string{"stays slow", "answers in time"} {
		t.Run(how, func(t *testing.T) {
			const grace = 2 * time.Second
			e := testutil.Etcd(t, 1)
			n := startNode(t, e, "s1", "127.0.0.1:0")
			app := register(t, e.Client(), "orders")
			elect(t, n, app)
			p, url := testutil.Proxy(t, e.Endpoint(0))
			var reads atomic.Int64
			ccfg := coord.ClientConfig([]string{url}, testutil.Logger(t))
			ccfg.DialOptions = append(ccfg.DialOptions, grpc.WithChainUnaryInterceptor(
				func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
					if _, ok := req.(*etcdserverpb.RangeRequest); ok {
						reads.Add(1)
					}
					return invoker(ctx, method, req, reply, cc, opts...)
				}))
			cli, err := clientv3.New(ccfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cli.Close() })
			// The client's connection is up before etcd's answers stop.
			if _, err := cli.Get(context.Background(), "warm-up"); err != nil {
				t.Fatal(err)
			}
			p.PauseRx()
			t.Cleanup(p.UnpauseRx)
			var d *worker.Discovery

			first := &firstRequest{}
			cfg := worker.DefaultConfig()
			cfg.AppName, cfg.Client, cfg.Servers = "orders", cli, []string{n.Addr()}
			cfg.HTTPClient = &http.Client{Transport: first}
			cfg.RequestTimeout, cfg.PingTimeout, cfg.EtcdGrace = 300*time.Millisecond, 200*time.Millisecond, grace
			cfg.Logger = testutil.Logger(t).Named("worker")
			d, err = worker.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(d.Close)
			began := time.Now()
			started := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				started <- d.Start(ctx)
			}()
			if how == "answers in time" {
				before := reads.Load()
				testutil.Eventually(t, 5*time.Second, "Start to have tried etcd twice", func() bool {
					return reads.Load() >= before+2
				})
				p.UnpauseRx()
			}
			select {
			case err := <-started:
				if err != nil {
					t.Fatalf("Start = %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Start did not return")
			}
			cur, _ := d.Current()
			if cur.Address != n.Addr() {
				t.Errorf("worker started at %+v, want %s", cur, n.Addr())
			}
			switch at := first.when(); how {
			case "stays slow":
				if at.IsZero() || at.Sub(began) < grace {
					t.Errorf("first HTTP request %v after Start began; want none before EtcdGrace (%v)", at.Sub(began), grace)
				}
			case "answers in time":
				if !at.IsZero() {
					t.Errorf("an HTTP request %v after Start began, though etcd answered before EtcdGrace", at.Sub(began))
				}
				if cur.Token == 0 {
					t.Errorf("worker started at %+v, want the owner as etcd names it, with its token", cur)
				}
			}
		})
	}
}
