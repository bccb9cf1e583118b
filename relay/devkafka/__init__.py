"""A local single-node Apache Kafka broker for development and integration tests.

Owns fetching the broker's jars with Maven into a cache (`dist`), running and supervising one
KRaft broker, combined broker and controller, in a child JVM (`broker`), and the body of
`ctct-relay dev-kafka` (`serve`). The running relay never imports this package.
"""

from relay.devkafka.broker import DevKafka
from relay.devkafka.dist import KAFKA_VERSION, KafkaDist, default_cache_dir, ensure_kafka
from relay.devkafka.errors import DevKafkaError
from relay.devkafka.serve import serve_dev_kafka

__all__ = [
    "KAFKA_VERSION",
    "DevKafka",
    "DevKafkaError",
    "KafkaDist",
    "default_cache_dir",
    "ensure_kafka",
    "serve_dev_kafka",
]
