package integration

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/batonhq/baton/internal/testutil"
)

// BenchmarkMemory: heap bytes and goroutines per owned app on one server,
// then per watched app in workers (one Discovery per app, sharing one
// etcd client), at 1,000 and 10,000 apps. The server's figure includes
// the in-process etcd's own copy of the keys it wrote. Run with
// -benchtime=1x.
func BenchmarkMemory(b *testing.B) {
	for _, apps := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("apps=%d", apps), func(b *testing.B) {
			for range b.N {
				bc := newBenchCluster(b, 1)
				ids := registerMany(b, bc, apps)
				cli := testutil.Client(b, bc.etcd)
				heap0, g0 := heapAndGoroutines()
				electAll(b, bc.nodes, ids)
				heap1, g1 := heapAndGoroutines()
				b.ReportMetric(float64(heap1-heap0)/float64(apps), "node-B/app")
				b.ReportMetric(float64(g1-g0)/float64(apps), "node-goroutines/app")
				startFleet(b, fleetConfig{N: apps, App: func(i int) string { return fmt.Sprintf("app-%d", i) }, Shared: cli, Servers: bc.addrs()})
				heap2, g2 := heapAndGoroutines()
				b.ReportMetric(float64(heap2-heap1)/float64(apps), "worker-B/app")
				b.ReportMetric(float64(g2-g1)/float64(apps), "worker-goroutines/app")
			}
		})
	}
}

func heapAndGoroutines() (uint64, int) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc, runtime.NumGoroutine()
}
