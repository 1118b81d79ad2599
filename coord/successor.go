package coord

import (
	"crypto/sha256"
	"encoding/binary"
	"slices"
	"strconv"
	"strings"
)

// Rank orders server ids for app by rendezvous (highest random weight)
// hashing: the first is the app's successor, the one that takes the app
// over when its owner key disappears, and the one workers ask first. Every
// process computes the same order from the same set of ids, and removing a
// server moves only the apps it ranked first. The weight of a server for
// an app is the first 8 bytes, big-endian, of SHA-256(serverID, 0x00,
// decimal appID); ties (never seen in practice) go to the smaller id. The
// input slice is not modified.
func Rank(appID int64, serverIDs []string) []string {
	type scored struct {
		id    string
		score uint64
	}
	s := make([]scored, len(serverIDs))
	for i, id := range serverIDs {
		s[i] = scored{id, weight(appID, id)}
	}
	slices.SortFunc(s, func(a, b scored) int {
		if a.score != b.score {
			if a.score > b.score {
				return -1
			}
			return 1
		}
		return strings.Compare(a.id, b.id)
	})
	out := make([]string, len(s))
	for i := range s {
		out[i] = s[i].id
	}
	return out
}

// Successor returns the server id Rank puts first, or false when there
// are no servers.
func Successor(appID int64, serverIDs []string) (string, bool) {
	best, found := "", false
	var bestScore uint64
	for _, id := range serverIDs {
		w := weight(appID, id)
		if !found || w > bestScore || w == bestScore && id < best {
			best, bestScore, found = id, w, true
		}
	}
	return best, found
}

func weight(appID int64, serverID string) uint64 {
	h := sha256.New()
	h.Write([]byte(serverID))
	h.Write([]byte{0})
	h.Write(strconv.AppendInt(nil, appID, 10))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}
