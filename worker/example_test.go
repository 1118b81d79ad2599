package worker_test

import (
	"context"
	"fmt"
	"time"

	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/worker"
)

// A worker follows whichever server owns its app: it asks once, then
// watches the app's owner key, and OnChange tells it where to send its
// traffic.
func Example() {
	etcd, err := embedded.Start(embedded.Config{}) // your cluster in production
	if err != nil {
		fmt.Println(err)
		return
	}
	defer etcd.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// A scheduler server somewhere, with the app registered.
	scfg := server.DefaultConfig()
	scfg.Client, scfg.ServerID, scfg.Listen = etcd.Client(), "s1", "127.0.0.1:0"
	node, err := server.NewNode(scfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := node.Start(ctx); err != nil {
		fmt.Println(err)
		return
	}
	defer node.Close(ctx)
	if _, err := node.Registry().Register(ctx, "orders"); err != nil {
		fmt.Println(err)
		return
	}

	// The worker.
	moved := make(chan worker.Server, 1)
	cfg := worker.DefaultConfig()
	cfg.AppName, cfg.Client = "orders", etcd.Client()
	cfg.OnChange = func(old, new worker.Server) { moved <- new }
	w, err := worker.New(cfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer w.Close()
	if err := w.Start(ctx); err != nil {
		fmt.Println(err)
		return
	}
	s := <-moved
	fmt.Println("worker of orders talks to", s.ServerID, "at its address:", s.Address == node.Addr())
	// Output: worker of orders talks to s1 at its address: true
}
