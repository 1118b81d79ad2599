package server_test

import (
	"context"
	"fmt"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/election"
	"github.com/batonhq/baton/server"
)

// Embedding a node in a Go scheduler: give it your etcd client, an
// address to listen on, and callbacks that start and stop your work for
// each app it owns.
func Example() {
	etcd, _ := embedded.Start(embedded.Config{}) // your cluster in production
	defer etcd.Close()
	ctx := context.Background()
	events := make(chan string, 2)

	cfg := server.DefaultConfig()
	cfg.Client = etcd.Client()
	cfg.Listen = "127.0.0.1:0"
	cfg.Callbacks = election.Callbacks{
		OnAcquire: func(ctx context.Context, app, token int64) { events <- fmt.Sprint("scheduling app ", app) },
		OnLose:    func(app, token int64, why election.Reason) { events <- fmt.Sprint("stopped app ", app, ": ", why) },
	}
	node, err := server.NewNode(cfg)
	if err != nil {
		panic(err)
	}
	if err := node.Start(ctx); err != nil {
		panic(err)
	}

	app, _ := node.Registry().Register(ctx, "orders")
	addr, _ := node.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, "")
	fmt.Println("workers of orders talk to this node:", addr == node.Addr())
	fmt.Println(<-events)

	stop, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	node.Close(stop) // hands its apps over, revokes its lease
	fmt.Println(<-events)
	// Output:
	// workers of orders talk to this node: true
	// scheduling app 1
	// stopped app 1: resigned
}
