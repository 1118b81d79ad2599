package server

import (
	"context"
	"sync"

	"github.com/batonhq/baton/coord"
)

// appCache remembers app records by name. A record never changes once
// written (apps are never renamed or deleted), so a cached record is
// always right, and /server/assert answers a known app with no etcd
// request: a worker starting while etcd is slow or frozen still gets its
// answer. Safe for concurrent use.
type appCache struct {
	mu     sync.RWMutex
	byName map[string]coord.AppRecord
}

func newAppCache() *appCache { return &appCache{byName: map[string]coord.AppRecord{}} }

func (c *appCache) get(name string) (coord.AppRecord, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	app, ok := c.byName[name]
	return app, ok
}

func (c *appCache) add(apps ...coord.AppRecord) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, a := range apps {
		c.byName[a.Name] = a
	}
}

// load adds every registered app; Start calls it so that assert needs
// etcd only for apps registered after the node started.
func (c *appCache) load(ctx context.Context, reg *coord.Registry) error {
	apps, err := reg.List(ctx) // with the decodable records when some are not
	c.add(apps...)
	return err
}

// lookup answers from the cache, else from etcd (caching the answer).
func (c *appCache) lookup(ctx context.Context, reg *coord.Registry, name string) (coord.AppRecord, error) {
	if app, ok := c.get(name); ok {
		return app, nil
	}
	app, err := reg.ByName(ctx, name)
	if err == nil {
		c.add(app)
	}
	return app, err
}
