package integration

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
)

// BenchmarkPlacement: three servers, 3,000 registered apps with no owner,
// every one asked for at the first server (workers listing the servers in
// one order: the PowerJob habit), 16 callers. "first-come" elects the
// asked server (Elect, Balance off); "balanced" places each app on its
// preferred live server (Place, Balance on). Reports apps placed per
// second and max/mean apps per server. Run with -benchtime=1x.
func BenchmarkPlacement(b *testing.B) {
	const apps = 3000
	for _, mode := range []string{"first-come", "balanced"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				e := testutil.Etcd(b, 1)
				bc := newBenchClusterOn(b, e, 3)
				ids := registerMany(b, bc, apps)
				asked := bc.nodes[0].Elector()
				answer := asked.Elect
				if mode == "balanced" {
					answer = asked.Place
				}
				work := make(chan int64, len(ids))
				for _, id := range ids {
					work <- id
				}
				close(work)
				var failed atomic.Int64
				var wg sync.WaitGroup
				start := time.Now()
				for range 16 {
					wg.Go(func() {
						for app := range work {
							if _, err := answer(context.Background(), app, coord.ProtocolHTTP, ""); err != nil {
								failed.Add(1)
							}
						}
					})
				}
				wg.Wait()
				took := time.Since(start)
				if failed.Load() > 0 {
					b.Fatalf("%d answers failed", failed.Load())
				}
				resp, err := bc.etcd.Client().Get(context.Background(), bc.keys.OwnerPrefix(), clientv3.WithPrefix())
				if err != nil {
					b.Fatal(err)
				}
				perServer := map[string]int{}
				for _, kv := range resp.Kvs {
					rec, err := coord.DecodeOwnerRecord(kv.Value)
					if err != nil {
						b.Fatal(err)
					}
					perServer[rec.ServerID]++
				}
				most := 0
				for _, n := range perServer {
					most = max(most, n)
				}
				b.ReportMetric(apps/took.Seconds(), "apps/s")
				b.ReportMetric(float64(most)/(float64(apps)/float64(len(bc.nodes))), "max/mean")
				b.Logf("%s: %v per server in %v", mode, perServer, took)
			}
		})
	}
}
