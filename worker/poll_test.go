package worker_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/pkg/v3/proxy"
	"google.golang.org/grpc/connectivity"
)

func TestPollingAsksTheCurrentServerOncePerRound(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", "127.0.0.1:0")
	n2 := startNode(t, e, "s2", "127.0.0.1:0")
	app := register(t, e.Client(), "orders")
	owner := elect(t, n, app)
	clock := testutil.NewFakeClock()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Servers = []string{n2.Addr(), n.Addr()} // no etcd: PowerJob's polling
		worker.SetClock(c, clock)
	})
	if w.current() != owner {
		t.Fatalf("worker at %q, owner %s", w.current(), owner)
	}
	start := w.metric(t, "baton_worker_http_requests_total", "")
	const rounds = 12 // two minutes at PowerJob's 10 s
	for i := 1; i <= rounds; i++ {
		clock.BlockUntil(1, 5*time.Second)
		clock.Advance(10 * time.Second)
		testutil.Eventually(t, 5*time.Second, "the round", func() bool {
			return w.metric(t, "baton_worker_rounds_total", "found") == float64(1+i)
		})
	}
	perMinute := (w.metric(t, "baton_worker_http_requests_total", "") - start) / 2
	t.Logf("polling: %v HTTP requests per worker per minute at a 10 s interval", perMinute)
	if perMinute > 6 {
		t.Fatalf("%v requests per minute, PowerJob sends 6", perMinute)
	}
	if w.metric(t, "baton_worker_watching", "") != 0 {
		t.Fatal("a worker without etcd claims to watch")
	}
}

func TestReportUnreachableStartsARoundAtOnce(t *testing.T) {
	e := testutil.Etcd(t, 1)
	nodes := map[string]string{}
	n1 := startNode(t, e, "s1", "127.0.0.1:0")
	n2 := startNode(t, e, "s2", "127.0.0.1:0")
	nodes[n1.Addr()], nodes[n2.Addr()] = "s1", "s2"
	app := register(t, e.Client(), "orders")
	owner := elect(t, n1, app)
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Servers = []string{n1.Addr(), n2.Addr()}
		c.Interval = time.Hour // only the report can start a round
	})
	if _, err := n1.Elector().HandOver(context.Background(), app); err != nil {
		t.Fatal(err)
	}
	w.discovery.ReportUnreachable("10.9.9.9:1") // not the current server: ignored
	w.discovery.ReportUnreachable(owner)
	w.wait(t, 5*time.Second, "the worker to move", func() bool { return w.current() == n2.Addr() })
}

// A worker cut off from etcd polls (its re-check fails, and after
// EtcdGrace it asks the servers), follows a handover by polling, and
// watches again when the cut heals: a partition that TCP rides out (the
// proxy holds the bytes and delivers them late), and one that lasts
// until gRPC's keepalive resets the connection (the proxy drops them).
func TestEtcdCutOffFallsBackToPollingAndBack(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cut, heal func(proxy.Server)
		// untilReset: keep the cut until the client's connection is
		// no longer ready (keepalive: about 12 s).
		untilReset bool
	}{
		{"held", func(p proxy.Server) { p.PauseTx(); p.PauseRx() }, func(p proxy.Server) { p.UnpauseTx(); p.UnpauseRx() }, false},
		{"dropped", func(p proxy.Server) { p.BlackholeTx(); p.BlackholeRx() }, func(p proxy.Server) { p.UnblackholeTx(); p.UnblackholeRx() }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := testutil.Etcd(t, 1)
			n1 := startNode(t, e, "s1", "127.0.0.1:0")
			n2 := startNode(t, e, "s2", "127.0.0.1:0")
			app := register(t, e.Client(), "orders")
			elect(t, n1, app)

			p, url := testutil.Proxy(t, e.Endpoint(0))
			cli := testutil.Client(t, e, url)
			w := startWorker(t, "orders", func(c *worker.Config) {
				c.Client = cli
				c.Servers = []string{n1.Addr(), n2.Addr()}
				c.Interval = 200 * time.Millisecond
				c.EtcdGrace = time.Second
			})
			if w.current() != n1.Addr() {
				t.Fatal("worker did not start at s1")
			}
			testutil.Eventually(t, 5*time.Second, "the worker to watch", func() bool {
				return w.metric(t, "baton_worker_watching", "") == 1
			})
			tc.cut(p)
			// The re-check fails within Interval + RequestTimeout; EtcdGrace
			// later the worker polls. It keeps its server.
			testutil.Eventually(t, 30*time.Second, "the worker to fall back to polling", func() bool {
				return w.metric(t, "baton_worker_watching", "") == 0
			})
			if w.current() != n1.Addr() {
				t.Fatalf("worker lost its server when etcd went away: %q", w.current())
			}
			// The owner moves; the worker learns it over HTTP.
			if _, err := n1.Elector().HandOver(context.Background(), app); err != nil {
				t.Fatal(err)
			}
			w.wait(t, 10*time.Second, "the worker to follow by polling", func() bool { return w.current() == n2.Addr() })
			if tc.untilReset {
				testutil.Eventually(t, 30*time.Second, "gRPC to reset the connection", func() bool {
					return cli.ActiveConnection().GetState() != connectivity.Ready
				})
			}

			tc.heal(p)
			testutil.Eventually(t, 30*time.Second, "the worker to watch again", func() bool {
				return w.metric(t, "baton_worker_watching", "") == 1
			})
			if _, err := n2.Elector().HandOver(context.Background(), app); err != nil {
				t.Fatal(err)
			}
			w.wait(t, 5*time.Second, "the worker to follow by watching", func() bool { return w.current() == n1.Addr() })
		})
	}
}

func TestLazyConnectFindsAServerThatAppearsLater(t *testing.T) {
	e := testutil.Etcd(t, 1)
	addr := deadAddr(t) // where the server will listen
	clock := testutil.NewFakeClock()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Servers = []string{addr}
		c.AllowLazyConnect = true
		worker.SetClock(c, clock)
	})
	if _, ok := w.discovery.Current(); ok || w.discovery.AppID() != 0 {
		t.Fatal("a lazy worker found something before any server existed")
	}
	n := startNode(t, e, "s1", addr)
	register(t, e.Client(), "orders")
	clock.BlockUntil(1, 5*time.Second)
	clock.Advance(10 * time.Second)
	w.wait(t, 10*time.Second, "the worker to find the server", func() bool { return w.current() == n.Addr() })
	if w.discovery.AppID() == 0 {
		t.Fatal("app id not resolved")
	}
}

// Without AllowLazyConnect, Start keeps trying until its ctx ends, then
// fails with ErrNoServer saying how often it tried.
func TestStartFailsClearlyWithoutLazyConnect(t *testing.T) {
	cfg := worker.DefaultConfig()
	cfg.AppName = "orders"
	cfg.Servers = []string{deadAddr(t)}
	cfg.RequestTimeout = 200 * time.Millisecond
	cfg.PingTimeout = 100 * time.Millisecond
	d, err := worker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err = d.Start(ctx)
	if !errors.Is(err, worker.ErrNoServer) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start = %v, want ErrNoServer once ctx ended", err)
	}
	var attempts int
	if _, scanErr := fmt.Sscanf(err.Error()[strings.Index(err.Error(), "gave up after"):], "gave up after %d attempts", &attempts); scanErr != nil || attempts < 2 {
		t.Errorf("Start = %v, want several attempts before giving up", err)
	}
}

// A worker started before its server (a fleet and its scheduler deployed
// together) waits for it instead of failing.
func TestStartWaitsForAServerThatStartsLater(t *testing.T) {
	e := testutil.Etcd(t, 1)
	cli := testutil.Client(t, e)
	register(t, cli, "orders")
	addr := deadAddr(t)
	cfg := worker.DefaultConfig()
	cfg.AppName = "orders"
	cfg.Servers = []string{addr}
	cfg.RequestTimeout = 300 * time.Millisecond
	cfg.PingTimeout = 200 * time.Millisecond
	cfg.Tries = 1
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	d, err := worker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	started := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		started <- d.Start(ctx)
	}()
	// Start has tried twice before the server exists.
	testutil.Eventually(t, 10*time.Second, "two attempts", func() bool {
		return testutil.Metric(t, reg, "baton_worker_http_requests_total", "") >= 2
	})
	select {
	case err := <-started:
		t.Fatalf("Start returned %v before the server started", err)
	default:
	}
	n := startNode(t, e, "s1", addr)
	if err := <-started; err != nil {
		t.Fatalf("Start = %v after the server started", err)
	}
	if cur, _ := d.Current(); cur.Address != n.Addr() {
		t.Errorf("worker found %+v, want %s", cur, n.Addr())
	}
}

// An unknown app is no reason to keep trying: Start fails at once.
func TestStartFailsAtOnceForAnUnknownApp(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", "127.0.0.1:0")
	cfg := worker.DefaultConfig()
	cfg.AppName = "nobody"
	cfg.Servers = []string{n.Addr()}
	d, err := worker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = d.Start(ctx)
	if err == nil || errors.Is(err, worker.ErrNoServer) || !strings.Contains(err.Error(), "not registered") {
		t.Fatalf("Start = %v, want the server's refusal", err)
	}
	if ctx.Err() != nil {
		t.Errorf("Start kept trying until its ctx ended: %v", err)
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		cfg  worker.Config
		want string
	}{
		{worker.Config{}, "AppName"},
		{worker.Config{AppName: "a"}, "Servers is empty and Client is nil"},
		{worker.Config{AppName: "a", Servers: []string{"nohost"}}, "Servers entry \"nohost\""},
		{worker.Config{AppName: "a", Servers: []string{"h:1"}, Interval: -time.Second}, "Interval (-1s)"},
		{worker.Config{AppName: "a", Servers: []string{"h:1"}, MaxFailedRounds: -2}, "MaxFailedRounds (-2)"},
		{worker.Config{AppName: "a", Servers: []string{"h:1"}, PingTimeout: 5 * time.Second, RequestTimeout: time.Second}, "PingTimeout (5s) must not exceed RequestTimeout (1s)"},
	} {
		if _, err := worker.New(tc.cfg); !errors.Is(err, worker.ErrInvalidConfig) || !errors.Is(err, coord.ErrInvalidConfig) || !contains(err.Error(), tc.want) {
			t.Errorf("New: %v, want an error naming %q", err, tc.want)
		}
	}
}

// A lazy worker with an etcd client and no server list finds an app
// registered after its Start through etcd, and watches it.
func TestLazyWorkerWithEtcdResolvesAnAppRegisteredLater(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", "127.0.0.1:0")
	cli := testutil.Client(t, e)
	clock := testutil.NewFakeClock()
	w := startWorker(t, "late", func(c *worker.Config) {
		c.Client = cli
		c.AllowLazyConnect = true
		worker.SetClock(c, clock)
	})
	if w.discovery.AppID() != 0 {
		t.Fatal("resolved an app that is not registered")
	}
	app := register(t, cli, "late")
	elect(t, n, app)
	clock.BlockUntil(1, 5*time.Second)
	clock.Advance(10 * time.Second)
	w.wait(t, 10*time.Second, "the worker to find the owner", func() bool { return w.current() == n.Addr() })
	testutil.Eventually(t, 5*time.Second, "the worker to watch", func() bool {
		return w.metric(t, "baton_worker_watching", "") == 1
	})
}

// While the worker watches etcd, an HTTP answer never overrides it: a
// server answering from a stale table (a deposed owner, say) after the
// worker's own traffic reported its server unreachable leaves the worker
// on the owner etcd names, with its token.
func TestAnHTTPAnswerNeverOverridesEtcdWhileWatching(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n := startNode(t, e, "s1", "127.0.0.1:0")
	cli := testutil.Client(t, e)
	app := register(t, cli, "orders")
	elect(t, n, app)
	var asked atomic.Int64
	stale := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"success":true,"data":"10.1.2.3:7700","message":""}`))
	}))
	defer stale.Close()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Servers = []string{strings.TrimPrefix(stale.URL, "http://")}
	})
	before, _ := w.discovery.Current()
	if before.Address != n.Addr() || before.Token == 0 {
		t.Fatalf("worker starts at %+v; want s1 with its token", before)
	}
	testutil.Eventually(t, 5*time.Second, "the worker to watch", func() bool {
		return w.metric(t, "baton_worker_watching", "") == 1
	})
	w.discovery.ReportUnreachable(n.Addr())
	testutil.Eventually(t, 5*time.Second, "the stale server to be asked", func() bool { return asked.Load() > 0 })
	// The round that asked it has finished once its result is counted.
	testutil.Eventually(t, 5*time.Second, "the round to finish", func() bool {
		return w.metric(t, "baton_worker_rounds_total", "") > 0
	})
	w.keepsServer(t, before, 500*time.Millisecond, "an HTTP answer replaced the owner etcd names")
}

// A lazy Start returns at once, even when every configured server hangs
// (the first round runs in the background), and Close right after it
// leaves nothing running.
func TestLazyStartDoesNotWaitForAHangingServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept() // accepts, never answers
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	}()
	cfg := worker.DefaultConfig()
	cfg.AppName = "orders"
	cfg.Servers = []string{l.Addr().String()}
	cfg.AllowLazyConnect = true
	cfg.Logger = testutil.Logger(t)
	d, err := worker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := d.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("lazy Start took %v with a hanging server; the round should run in the background", took)
	}
	d.Close()
}

// A Discovery closed and created again for the same app with the same
// metrics registry registers its metrics again (they left with Close).
func TestDiscoveryRecreatedWithOneRegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	for i := 0; i < 3; i++ {
		cfg := worker.DefaultConfig()
		cfg.AppName, cfg.Servers, cfg.Registerer = "orders", []string{deadAddr(t)}, reg
		d, err := worker.New(cfg)
		if err != nil {
			t.Fatalf("New #%d: %v", i+1, err)
		}
		d.Close()
	}
	if fams, _ := reg.Gather(); len(fams) != 0 {
		t.Errorf("%d metric families left after Close", len(fams))
	}
}
