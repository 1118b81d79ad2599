package worker_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
)

// A worker whose own traffic keeps failing reports its server again and
// again; the rounds those reports start back off instead of running back
// to back: once one ran, the next waits for the clock, and the reports
// meanwhile add nothing.
func TestRepeatedReportsBackOff(t *testing.T) {
	var asked atomic.Int64
	var addr string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if strings.HasPrefix(r.URL.Path, "/server/assert") {
			w.Write([]byte(`{"success":true,"data":7,"message":""}`))
			return
		}
		w.Write([]byte(`{"success":true,"data":"` + addr + `","message":""}`))
	}))
	defer srv.Close()
	addr = strings.TrimPrefix(srv.URL, "http://")
	clock := testutil.NewFakeClock()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Servers = []string{addr}
		worker.SetClock(c, clock)
	})
	rounds := func() float64 { return w.metric(t, "baton_worker_rounds_total", "") }
	before := rounds()
	w.discovery.ReportUnreachable(addr)
	testutil.Eventually(t, 5*time.Second, "the reported round", func() bool { return rounds() == before+1 })
	for i := 0; i < 20; i++ {
		w.discovery.ReportUnreachable(addr)
		// The loop has taken the report once it has planned a round
		// (the Interval timer and the planned round are pending) or
		// started one.
		testutil.Eventually(t, 5*time.Second, "the report to be taken", func() bool {
			return clock.Pending() >= 2 || rounds() > before+1
		})
	}
	if got := rounds(); got != before+1 {
		t.Fatalf("%v rounds for 21 reports without the clock moving, want 1", got-before)
	}
	clock.Advance(worker.DefaultConfig().TryPause)
	testutil.Eventually(t, 5*time.Second, "the planned round", func() bool { return rounds() == before+2 })
}

// etcd losing its leader cancels every require-leader watch at once. A
// worker keeps its server and watches again when etcd is back; if that
// is within EtcdGrace it sends no HTTP request at all.
func TestLeaderLossWithinEtcdGraceSendsNoHTTP(t *testing.T) {
	e := testutil.Etcd(t, 3)
	n := startNode(t, e, "s1", "127.0.0.1:0")
	admin := testutil.Client(t, e)
	app := register(t, admin, "orders")
	owner := elect(t, n, app)
	leader, err := e.Leader(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	survivor := (leader + 1) % 3
	cli := testutil.Client(t, e, e.Endpoint(survivor))
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Servers = []string{n.Addr()}
		c.EtcdGrace = time.Minute
	})
	watching := func() bool { return w.metric(t, "baton_worker_watching", "") == 1 }
	testutil.Eventually(t, 5*time.Second, "the worker to watch", watching)

	stopped := []int{leader, (leader + 2) % 3}
	for _, i := range stopped {
		if err := e.Stop(i); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 30*time.Second, "the watch to be cancelled", func() bool { return !watching() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, i := range stopped {
		if err := e.Restart(ctx, i); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 30*time.Second, "the worker to watch again", watching)
	if got := w.metric(t, "baton_worker_http_requests_total", ""); got != 0 {
		t.Errorf("%v HTTP requests while etcd had no leader for less than EtcdGrace, want 0", got)
	}
	if cur, _ := w.discovery.Current(); cur.Address != owner || cur.Token == 0 {
		t.Errorf("worker at %+v after the outage, want %s with its token", cur, owner)
	}
}

// A watch on a plain etcd client (no gRPC keepalive) through a
// connection that silently stops carrying anything is never broken by
// the client; the worker's periodic re-check notices, and it follows a
// handover by polling.
func TestAStalledWatchIsNoticedWithoutKeepalive(t *testing.T) {
	e := testutil.Etcd(t, 1)
	n1 := startNode(t, e, "s1", "127.0.0.1:0")
	n2 := startNode(t, e, "s2", "127.0.0.1:0")
	app := register(t, e.Client(), "orders")
	elect(t, n1, app)
	p, url := testutil.Proxy(t, e.Endpoint(0))
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Servers = []string{n1.Addr(), n2.Addr()}
		c.Interval = 200 * time.Millisecond
		c.EtcdGrace = time.Second
	})
	testutil.Eventually(t, 5*time.Second, "the worker to watch", func() bool {
		return w.metric(t, "baton_worker_watching", "") == 1
	})
	p.BlackholeTx()
	p.BlackholeRx()
	defer func() {
		p.UnblackholeTx()
		p.UnblackholeRx()
	}()
	if _, err := n1.Elector().HandOver(context.Background(), app); err != nil {
		t.Fatal(err)
	}
	w.wait(t, 15*time.Second, "the worker to follow the handover", func() bool { return w.current() == n2.Addr() })
}
