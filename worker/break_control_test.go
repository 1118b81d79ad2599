package worker_test

import (
	"context"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

// pathRecorder is a scheduler's transport listener that records the
// paths it is asked for.
type pathRecorder struct {
	addr  string
	mu    sync.Mutex
	paths []string
}

func startPathRecorder(t *testing.T, ip string) *pathRecorder {
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	pr := &pathRecorder{addr: ln.Addr().String()}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pr.mu.Lock()
		pr.paths = append(pr.paths, r.URL.Path)
		pr.mu.Unlock()
		http.NotFound(w, r)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return pr
}

func (pr *pathRecorder) all() string {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return strings.Join(pr.paths, " ")
}

func (pr *pathRecorder) asked(path string) int {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	n := 0
	for _, p := range pr.paths {
		if p == path {
			n++
		}
	}
	return n
}

// Promise 4: a polling worker asks control addresses, never transport
// addresses, for /server/acquire. The scheduler's transport is on another
// address of its host than the one in the worker's server list (another
// interface; or the list names the host by name): currentControl finds no
// configured server "on the same host" and asks the transport address.
func TestBreakPollingWorkerNeverAsksTheTransportForAcquire(t *testing.T) {
	for _, tc := range []struct{ name, transportIP, listHost string }{
		{"transport on another interface", "127.0.0.2", "127.0.0.1"},
		{"server list by host name", "127.0.0.1", "localhost"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := testutil.Etcd(t, 1)
			tr := startPathRecorder(t, tc.transportIP)
			cfg := server.DefaultConfig()
			cfg.Client = testutil.Client(t, e)
			cfg.ServerID = "s1"
			cfg.TTL = time.Second
			cfg.Listen = "127.0.0.1:0"
			cfg.Logger = testutil.Logger(t).Named("s1")
			cfg.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: tr.addr}}
			n, err := server.NewNode(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := n.Start(ctx); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { closeNode(n) })
			register(t, e.Client(), "orders")
			_, port, _ := net.SplitHostPort(n.Addr())
			r := startWorker(t, "orders", func(c *worker.Config) {
				c.Servers = []string{net.JoinHostPort(tc.listHost, port)}
				c.Interval = 100 * time.Millisecond
			})
			if got := r.current(); got != tr.addr {
				t.Fatalf("current %q, want the transport %s", got, tr.addr)
			}
			// A few polling rounds.
			testutil.Eventually(t, 5*time.Second, "three polling rounds", func() bool {
				return r.metric(t, "baton_worker_rounds_total", "") >= 3
			})
			if k := tr.asked("/server/acquire"); k > 0 {
				t.Fatalf("the worker asked the transport address %s for /server/acquire %d times (paths: %s)", tr.addr, k, tr.all())
			}
		})
	}
}
