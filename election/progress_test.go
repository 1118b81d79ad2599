package election_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonhq/baton/internal/testutil"
)

// The guard's progress requests go to the owner watch's stream while the
// watch restarts under them (a guard firing, a broken watch). clientv3
// answers a request for a stream it no longer has by opening that stream
// anew, with no watch on it, for the life of its Watcher: on the
// client's shared Watcher, for the life of the client, one more etcd
// watch stream each time a request lost that race. Requests now go
// through each watch generation's own Watcher, closed with it; after
// many restarts hammered with requests, etcd holds as many watch streams
// as before.
func TestProgressRequestsRacingWatchRestartsLeaveNoStreamBehind(t *testing.T) {
	c := newCluster(t, 1, 2*time.Second)
	a := c.addNode("a")
	electAll(t, c, a, c.registerN(t, 1))
	streams := func() float64 {
		return testutil.Metric(t, prometheus.DefaultGatherer, "etcd_debugging_mvcc_watch_stream_total", "")
	}
	before := streams()

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				rctx, rcancel := context.WithTimeout(ctx, 100*time.Millisecond)
				_ = a.el.RequestProgress(rctx)
				rcancel()
			}
		})
	}
	for range 30 {
		old := a.el.OwnerWatch()
		a.el.Rewatch()
		testutil.Eventually(t, 5*time.Second, "the owner watch to restart", func() bool {
			now := a.el.OwnerWatch()
			return now != nil && now != old
		})
	}
	cancel()
	wg.Wait()
	t.Logf("etcd watch streams: %v before, %v right after the restarts", before, streams())
	testutil.Eventually(t, 5*time.Second, "etcd's watch streams back to where they were", func() bool {
		return streams() <= before
	})
}
