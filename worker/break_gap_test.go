package worker_test

import (
	"context"
	"fmt"
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

// The worker's watch breaks while etcd serves it (here: the watch resumes
// at a compacted revision), and before the worker has watched again its
// own traffic reports the owner unreachable. The round that report starts
// runs with the watch gone, so loop.finished takes the HTTP answer — here
// a stale one — as the server, dropping etcd's owner, its ServerID and its
// token, although etcd answers every read. finished treats "not watching
// at this instant" as "etcd does not serve the worker"; the gap lasts
// until the next resync attempt (Jitter, then a backoff of up to 1 s; the
// fake clock holds it open here, so the result is deterministic).
//
// Proves: "an HTTP answer never replaces what etcd says" does not hold
// between a broken watch and its replacement.
func TestAnHTTPAnswerDoesNotOverrideEtcdBetweenWatches(t *testing.T) {
	e := testutil.Etcd(t, 1)
	admin := testutil.Client(t, e)
	app := register(t, admin, "orders")
	ownerAddr := deadAddr(t) // the owner's address: the worker's traffic to it fails
	token := putOwner(t, admin, app, "s1", ownerAddr)
	var asked atomic.Int64
	stale := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"success":true,"data":"10.1.2.3:7700","message":""}`))
	}))
	defer stale.Close()

	p, url := testutil.Proxy(t, e.Endpoint(0))
	cli := testutil.Client(t, e, url)
	clock := testutil.NewFakeClock()
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Servers = []string{strings.TrimPrefix(stale.URL, "http://")}
		worker.SetClock(c, clock)
		c.EtcdGrace = time.Hour
	})
	want := worker.Server{Address: ownerAddr, ServerID: "s1", Token: token}
	if cur, _ := w.discovery.Current(); cur != want {
		t.Fatalf("worker starts at %+v, want %+v", cur, want)
	}
	testutil.Eventually(t, 5*time.Second, "the worker to watch", func() bool {
		return w.metric(t, "baton_worker_watching", "") == 1
	})

	// Break the watch: the connection goes, etcd compacts past the
	// watch's revision, the connection comes back and the resumed watch
	// is cancelled with ErrCompacted. etcd serves the worker all along
	// after that.
	p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	put, err := admin.Put(ctx, "/elsewhere", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Compact(ctx, put.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	testutil.ProxyAt(t, url, e.Endpoint(0))
	t.Cleanup(func() { w.discovery.Close(); cli.Close() })
	testutil.Eventually(t, 15*time.Second, "the watch to break", func() bool {
		return w.metric(t, "baton_worker_watching", "") == 0
	})
	if _, err := cli.Get(ctx, "/"); err != nil {
		t.Fatalf("etcd does not serve the worker's client: %v", err)
	}

	w.discovery.ReportUnreachable(ownerAddr)
	testutil.Eventually(t, 5*time.Second, "the report's round to finish", func() bool {
		return w.metric(t, "baton_worker_rounds_total", "") > 0
	})
	w.keepsServer(t, want, 300*time.Millisecond,
		fmt.Sprintf("an HTTP answer (asked %d times) replaced the owner etcd names while etcd serves the worker", asked.Load()))
}
