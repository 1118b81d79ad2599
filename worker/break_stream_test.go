package worker_test

import (
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"go.uber.org/zap"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
)

// A partition between the worker and etcd (the proxy holds every byte
// both ways, as a network partition does: TCP delivers them late, never
// loses them) makes the re-check and then every resync fail. After the
// partition heals the worker watches again, and once it is closed no
// etcd watch stream it opened is left running in the caller's client —
// also not the streams of watches it gave up before etcd created them.
func TestFailedResyncsLeaveNoWatchStreamBehind(t *testing.T) {
	e := testutil.Etcd(t, 1)
	admin := testutil.Client(t, e)
	app := register(t, admin, "orders")
	putOwner(t, admin, app, "s1", "127.0.0.1:7700")
	if n := watchStreams(); n != 0 {
		t.Fatalf("%d watch streams before the worker starts", n)
	}

	p, url := testutil.Proxy(t, e.Endpoint(0))
	// A plain client, as the worker's doc allows: no gRPC keepalive, so
	// the held connection stays "ready" and every resync reaches Watch.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	w := startWorker(t, "orders", func(c *worker.Config) {
		c.Client = cli
		c.Interval = 200 * time.Millisecond
		c.EtcdGrace = time.Hour // no polling: this is about the watch alone
	})
	watching := func() bool { return w.metric(t, "baton_worker_watching", "") == 1 }
	testutil.Eventually(t, 5*time.Second, "the worker to watch", watching)

	p.PauseTx()
	p.PauseRx()
	testutil.Eventually(t, 10*time.Second, "the re-check to fail", func() bool { return !watching() })
	// Hold the partition while resyncs fail (the first within Jitter,
	// then backing off from 250 ms to 1 s).
	hold := time.NewTimer(3 * time.Second)
	<-hold.C
	p.UnpauseTx()
	p.UnpauseRx()
	testutil.Eventually(t, 20*time.Second, "the worker to watch again", watching)

	t.Logf("%d watch streams in the worker's client while it watches again", watchStreams())
	w.discovery.Close()
	if n := waitStreams(0, 5*time.Second); n > 0 {
		t.Fatalf("%d etcd watch streams the worker opened are still running 5 s after its Close", n)
	}
}
